"""One module per method; importing a module registers its method."""
from . import lora  # noqa: F401
