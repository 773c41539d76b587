#!/usr/bin/env python3
"""Write the demo task's data: deltatune/demo_data/train.jsonl and test.jsonl (deterministic; rerun to check).

The task is structured extraction: a one-sentence description of a person in, one line of JSON out,

    system     Reply with JSON only: {"name": "...", "age": 0, "city": "..."}
    user       At 41, Dalia moved to Bergen for work.
    assistant  {"name": "Dalia", "age": 41, "city": "Bergen"}

It is chosen because the embedded SmolLM2-135M-Instruct, although told the exact format, rarely produces it
(it quotes the age, copies the whole sentence into "name", invents cities), while the skill needed is
copying and formatting rather than knowledge a 135M model lacks, so a few minutes of LoRA on a CPU can teach it.

The held-out split is honest by construction: its names and cities never occur in train (two disjoint
pools), and two of its ten sentence templates are never seen in training either, so a gain cannot come
from memorised answers. Ages are drawn from 18-89 in both splits (a number, not an entity).

    python3 scripts/make_demo_data.py            # rewrites the two files
    python3 scripts/make_demo_data.py --check    # exits 1 if the shipped files differ from a fresh run
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "deltatune" / "demo_data"
SEED = 20240603
N_TRAIN, N_TEST = 320, 50
SYSTEM = 'Reply with JSON only: {"name": "...", "age": 0, "city": "..."}'

NAMES = """Maria Ahmed Sofia Lukas Chen Priya Omar Elena Kenji Fatima Jonas Amara Diego Ingrid Tariq Yuki Nadia
Pavel Lucia Emeka Hana Mateo Aisha Felix Ravi Zara Bruno Leila Tomas Mei Hugo Ines Kofi Sara Ivan Noor Pablo Greta
Arjun Chloe Dmitri Olga Samuel Rosa Malik Anya Viktor Camila Rahul Freya Jamal Lena Marco Dalia Hiro Alma Nikolai
Beatriz Emil Keiko Oscar Yara Anders Lina Rafael Mira Jin Tessa Hamza Clara Milan Sana Leon Vera Andre Noemi Karim
Ada Stefan Lotte Yusuf Iris Marek Paula Ali Astrid Carlos Rina Tobias Eva Imran Selma Pedro Nora Farid Julia Kai
Maja Abebe Bianca Cosmin Dana Eitan Fiona Goran Helga Idris Jana Kwame Laila Mateus Nia Orla Pia Quentin Rania
Soren Talia Ugo Vesna Wanjiru Xavier Yosef Zuzana Aino Bilal Carmen Darius Esra Florin Gita Hakan Ilse Jonah Kamala
Lars Mona Nils Ola Pooja Rui Siobhan Teodor Ulla Vikram Wendy Yasmin Zoltan Agnes Boris Cecile Dario Elif Femi
Gustav Hiba Ioana Jakob Kiran Luca Magda Nikhil Oksana Petra Ramon Sunita Tiago Uma Valeria Wiktor Ayumi Bongani
Celia Dorian Emre Farah Gideon Halima Ignacio Jasmin Kasia Lorenzo Minh Naledi Otto Paloma Rashid Svetlana Thabo
Ursula Vito Xiomara Yannick Zainab""".split()
CITIES = """Lyon Porto Osaka Leeds Quito Lagos Hanoi Bergen Krakow Seville Dublin Tucson Accra Bremen Cusco Tampere
Nagoya Gdansk Bilbao Malmo Turin Mombasa Graz Denver Perth Ghent Split Pune Izmir Cork Aarhus Basel Nantes Tartu
Galway Leipzig Utrecht Bologna Fresno Halifax Brno Lille Kyoto Medan Rosario Durban Tbilisi Salta Hobart Davao
Oaxaca Tromso Lublin Varna Sapporo Geneva Oulu Kochi Mysore Rennes Dundee Bruges Parma Cadiz Almaty Tulsa Omaha
Boise Regina Luxor Fez Chennai Surat Cebu Lima Cali Recife Natal Belem Toledo Verona Bergamo Poznan Riga Kaunas
Antwerp Arequipa Aswan Asuncion Austin Bari Belfast Bern Bonn Brisbane Bristol Calgary Cardiff Catania Cluj
Coimbra Cordoba Curitiba Daegu Dakar Darwin Debrecen Dresden Dhaka Edmonton Eindhoven Florence Fukuoka Genoa Gothenburg
Granada Guayaquil Hamburg Hannover Harare Helsinki Hiroshima Houston Iasi Incheon Innsbruck Jaipur Kampala Kazan
Kigali Kobe Kolkata Kumasi Linz Liverpool Lusaka Madurai Malaga Manaus Maputo Marseille Memphis Mendoza Milwaukee
Minsk Montreal Munich Nairobi Nashville Nice Odessa Orlando Oslo Ottawa Palermo Pisa Plovdiv Portland Pretoria
Puebla Quebec Reno Rotterdam Salvador Santander Seattle Sendai Sibiu Skopje Sucre Stuttgart Suva Tallinn Tampa
Tirana Toulouse Trieste Turku Uppsala Valencia Valparaiso Vilnius Winnipeg Wroclaw Yerevan Zagreb Zurich""".split()
TEMPLATES = [
    "{name}, {age}, lives in {city}.",
    "{name} is {age} years old and lives in {city}.",
    "{city} resident {name} ({age}) opened a bakery last spring.",
    "At {age}, {name} moved to {city} for work.",
    "Meet {name} from {city}, who just turned {age}.",
    "The {age}-year-old {name} has lived in {city} since childhood.",
    "{name} ({age}) commutes to an office in {city}.",
    "Our new colleague in {city} is {name}, aged {age}.",
]
TEST_ONLY_TEMPLATES = [  # phrasings the adapter never sees in training
    "Born {age} years ago, {name} now calls {city} home.",
    "In {city}, {name} celebrated turning {age} with friends.",
]


def _split(pool: list[str], n_test: int, rng: random.Random) -> tuple[list[str], list[str]]:
    """(train pool, test pool): disjoint, so no held-out entity is ever trained on."""
    shuffled = sorted(set(pool))
    rng.shuffle(shuffled)
    return shuffled[n_test:], shuffled[:n_test]


def _record(rng: random.Random, names: list[str], cities: list[str], templates: list[str]) -> dict:
    name, city, age = rng.choice(names), rng.choice(cities), rng.randint(18, 89)
    text = rng.choice(templates).format(name=name, age=age, city=city)
    answer = json.dumps({"name": name, "age": age, "city": city})
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": text},
        {"role": "assistant", "content": answer},
    ]
    return {"messages": messages, "reference": answer}


def build() -> dict[str, list[dict]]:
    rng = random.Random(SEED)
    train_names, test_names = _split(NAMES, 40, rng)
    train_cities, test_cities = _split(CITIES, 40, rng)
    train = [_record(rng, train_names, train_cities, TEMPLATES) for _ in range(N_TRAIN)]
    test = [_record(rng, test_names, test_cities, TEMPLATES + TEST_ONLY_TEMPLATES) for _ in range(N_TEST)]
    return {"train": train, "test": test}


def render(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="compare with the shipped files instead of writing")
    parser.add_argument("--out", type=Path, default=OUT, help=f"output directory (default {OUT})")
    args = parser.parse_args(argv)
    splits = build()
    for split, records in splits.items():
        path = args.out / f"{split}.jsonl"
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
