#!/usr/bin/env python3
"""Write the task family: deltatune/demo_data/tasks/<task>.<split>.jsonl (seeded, deterministic; --check verifies).

Five related structured-extraction tasks (one sentence in, one line out) on which methods can differ, and a
sixth, new task that shares their skills, for composition (LoRAHub):

    task        out                                                     skill it adds
    person      {"name": "Dalia", "age": 41, "city": "Bergen"}          the demo's fields (new sentences)
    order       {"name": "Dalia", "item": "lamps", "qty": 3}            a count and a noun
    contact     {"name": "Dalia", "email": "...", "phone": "555-0142"}  copying odd tokens
    person_csv  Dalia,41,Bergen                                         the person fields, another format
    event       {"event": "book fair", "date": "2026-03-05", "time": "15:30"}
                                                                        the hard one: month names to ISO dates,
                                                                        12-hour to 24-hour times
    booking     {"name": "Dalia", "city": "Bergen", "guests": 4, "date": "2026-03-05"}
                (new task: names and cities as person, a count as order, a date as event)

Splits: train (256) / validation (40) / test (50) for the five; fewshot (20) / validation (40) / test (50)
for booking. Names, cities and items come in three disjoint pools (train, validation, test), so no
validation or held-out entity is ever trained on, and each task has two sentence templates that only
validation and test use. Choose every setting on validation; score test once:

    deltatune eval --adapter ADAPTER --data deltatune/demo_data/tasks/event.test.jsonl --match exact

    python3 scripts/make_task_family.py            # rewrites the files
    python3 scripts/make_task_family.py --check    # exits 1 if the shipped files differ from a fresh run
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_demo_data import CITIES, NAMES, TEMPLATES as PERSON_TEMPLATES, TEST_ONLY_TEMPLATES as PERSON_HELD  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "deltatune" / "demo_data" / "tasks"
SEED = 20261206
SIZES = {"train": 256, "validation": 40, "test": 50}
BOOKING_SIZES = {"fewshot": 20, "validation": 40, "test": 50}
MONTHS = "January February March April May June July August September October November December".split()
ITEMS = """lamps chairs mugs notebooks tickets candles plates towels pens batteries pillows folders bottles
cables helmets jackets blankets kettles mirrors baskets shovels ladders umbrellas scarves gloves sandals
bowls spoons forks knives pots pans jars brushes rulers stamps magnets balloons posters maps radios
clocks speakers keyboards monitors routers printers tablets stools benches shelves""".split()
EVENTS = """team meeting|book fair|concert|dentist appointment|board review|yoga class|job interview|
wedding rehearsal|product launch|piano recital|town hall|science fair|chess match|parent evening|
film screening|charity dinner|code review|art exhibition|budget meeting|football practice|poetry reading|
farmers market|museum tour|tax consultation|flight briefing|safety drill|press conference|
cooking workshop|school play|garden party""".replace("\n", "").split("|")
DOMAINS = ["mail.com", "post.org", "inbox.net", "example.com", "web.de", "corp.io"]

SYSTEMS = {
    "person": 'Reply with JSON only: {"name": "...", "age": 0, "city": "..."}',
    "order": 'Reply with JSON only: {"name": "...", "item": "...", "qty": 0}',
    "contact": 'Reply with JSON only: {"name": "...", "email": "...", "phone": "..."}',
    "person_csv": "Reply with one CSV line only: name,age,city",
    "event": 'Reply with JSON only: {"event": "...", "date": "YYYY-MM-DD", "time": "HH:MM"}',
    "booking": 'Reply with JSON only: {"name": "...", "city": "...", "guests": 0, "date": "YYYY-MM-DD"}',
}
# (templates seen in training, templates only validation and test use)
TEMPLATES = {
    "person": (PERSON_TEMPLATES, PERSON_HELD),
    "person_csv": (PERSON_TEMPLATES, PERSON_HELD),
    "order": ([
        "{name} ordered {qty} {item}.",
        "{name} bought {qty} {item} yesterday.",
        "Order from {name}: {qty} {item}.",
        "{qty} {item} were delivered to {name}.",
        "{name} asked for {qty} more {item}.",
        "Please send {qty} {item} to {name}.",
    ], [
        "{name} returned {qty} {item} this morning.",
        "A box of {qty} {item} is waiting for {name}.",
    ]),
    "contact": ([
        "You can reach {name} at {email} or {phone}.",
        "{name}: {phone}, {email}",
        "Contact {name} by email ({email}) or phone ({phone}).",
        "{name}'s number is {phone} and the email is {email}.",
        "Email {email} or call {phone} to talk to {name}.",
        "New client {name}, phone {phone}, mail {email}.",
    ], [
        "For questions ask {name} ({email}, tel. {phone}).",
        "Call {phone} and ask for {name}, or write to {email}.",
    ]),
    "event": ([
        "The {event} is on {month} {day}, {year} at {time}.",
        "{Event} scheduled for {day} {month} {year}, {time}.",
        "Reminder: {event} on {month} {day}, {year}, starting {time}.",
        "We moved the {event} to {time} on {month} {day}, {year}.",
        "Please join the {event} at {time}, {month} {day}, {year}.",
        "{month} {day}, {year}: the {event} begins at {time}.",
    ], [
        "Save the date: {day} {month} {year}, {time}, for the {event}.",
        "Our {event} starts at {time} on {month} {day}, {year}.",
    ]),
    "booking": ([
        "{name} booked a table for {guests} in {city} on {month} {day}, {year}.",
        "Reservation for {name}, {guests} guests, {city}, {day} {month} {year}.",
        "On {month} {day}, {year}, {name} expects {guests} people at the {city} venue.",
        "{name} reserved {guests} seats in {city} for {month} {day}, {year}.",
        "Party of {guests} under {name} in {city} on {day} {month} {year}.",
        "Please confirm the booking of {name} in {city}: {guests} guests, {month} {day}, {year}.",
    ], [
        "In {city}, {name} needs room for {guests} on {day} {month} {year}.",
        "{name} is bringing {guests} friends to {city} on {month} {day}, {year}.",
    ]),
}


def _pools(items: list[str], rng: random.Random, n_val: int, n_test: int) -> dict[str, list[str]]:
    """Disjoint train / validation / test pools of one entity kind."""
    shuffled = sorted(set(items))
    rng.shuffle(shuffled)
    return {"test": shuffled[:n_test], "validation": shuffled[n_test:n_test + n_val],
            "train": shuffled[n_test + n_val:]}


def _date(rng: random.Random) -> tuple[dict, str]:
    year, month, day = rng.randint(2019, 2029), rng.randint(1, 12), rng.randint(1, 28)
    return {"year": year, "month": MONTHS[month - 1], "day": day}, f"{year:04d}-{month:02d}-{day:02d}"


def _time(rng: random.Random) -> tuple[str, str]:
    """("3:30 pm", "15:30"); a full hour is written "11 am"."""
    hour24, minute = rng.randint(0, 23), rng.choice([0, 0, 15, 30, 45, 10, 20, 50])
    hour12, suffix = (hour24 % 12 or 12), ("am" if hour24 < 12 else "pm")
    spoken = f"{hour12} {suffix}" if minute == 0 else f"{hour12}:{minute:02d} {suffix}"
    return spoken, f"{hour24:02d}:{minute:02d}"


def _fields(task: str, rng: random.Random, pools: dict[str, list[str]]) -> tuple[dict, str]:
    """(template fields, the answer line) of one record."""
    name, city = rng.choice(pools["names"]), rng.choice(pools["cities"])
    if task in ("person", "person_csv"):
        age = rng.randint(18, 89)
        answer = json.dumps({"name": name, "age": age, "city": city}) if task == "person" else f"{name},{age},{city}"
        return {"name": name, "age": age, "city": city}, answer
    if task == "order":
        item, qty = rng.choice(pools["items"]), rng.randint(2, 60)
        return {"name": name, "item": item, "qty": qty}, json.dumps({"name": name, "item": item, "qty": qty})
    if task == "contact":
        email = f"{name.lower()}{rng.choice(['', '.', '_'])}{rng.randint(1, 99)}@{rng.choice(DOMAINS)}"
        phone = f"555-{rng.randint(0, 9999):04d}"
        return {"name": name, "email": email, "phone": phone}, json.dumps({"name": name, "email": email, "phone": phone})
    if task == "event":
        event = rng.choice(pools["events"])
        date_fields, iso = _date(rng)
        spoken, hhmm = _time(rng)
        fields = {"event": event, "Event": event[0].upper() + event[1:], "time": spoken, **date_fields}
        return fields, json.dumps({"event": event, "date": iso, "time": hhmm})
    if task == "booking":
        guests = rng.randint(2, 12)
        date_fields, iso = _date(rng)
        fields = {"name": name, "city": city, "guests": guests, **date_fields}
        return fields, json.dumps({"name": name, "city": city, "guests": guests, "date": iso})
    raise ValueError(f"unknown task {task!r}; known: {sorted(SYSTEMS)}")


def _record(task: str, rng: random.Random, pools: dict[str, list[str]], templates: list[str]) -> dict:
    fields, answer = _fields(task, rng, pools)
    messages = [
        {"role": "system", "content": SYSTEMS[task]},
        {"role": "user", "content": rng.choice(templates).format(**fields)},
        {"role": "assistant", "content": answer},
    ]
    return {"messages": messages}  # the reference is the final assistant turn (deltatune eval reads it)


def build() -> dict[str, list[dict]]:
    """{"<task>.<split>": records} for every task and split."""
    rng = random.Random(SEED)
    kinds = {"names": _pools(NAMES, rng, 30, 40), "cities": _pools(CITIES, rng, 30, 40),
             "items": _pools(ITEMS, rng, 8, 10), "events": _pools(EVENTS, rng, 5, 6)}
    out = {}
    for task in SYSTEMS:
        seen, held = TEMPLATES[task]
        for split, n in (BOOKING_SIZES if task == "booking" else SIZES).items():
            pool_split = "train" if split == "fewshot" else split
            pools = {kind: by_split[pool_split] for kind, by_split in kinds.items()}
            templates = seen if pool_split == "train" else seen + held
            task_rng = random.Random(f"{SEED}:{task}:{split}")  # one task's records do not move when another changes
            out[f"{task}.{split}"] = [_record(task, task_rng, pools, templates) for _ in range(n)]
    return out


def render(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="compare with the shipped files instead of writing")
    parser.add_argument("--out", type=Path, default=OUT, help=f"output directory (default {OUT})")
    args = parser.parse_args(argv)
    for stem, records in build().items():
        path = args.out / f"{stem}.jsonl"
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != render(records):
                print(f"{path} differs from a fresh run of {Path(__file__).name}; rerun it without --check", file=sys.stderr)
                return 1
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render(records), encoding="utf-8")
        print(f"wrote {len(records)} records to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
