"""One module per method; importing a module registers its method."""
from . import lora  # noqa: F401
from . import dora  # noqa: F401
from . import ia3  # noqa: F401
from . import prompt_tuning  # noqa: F401
from . import p_tuning  # noqa: F401
from . import prefix_tuning  # noqa: F401
from . import fishmask  # noqa: F401
from . import child_tuning  # noqa: F401
from . import bottleneck  # noqa: F401
from . import full  # noqa: F401
from . import bitfit  # noqa: F401
from . import adalora  # noqa: F401
from . import relora  # noqa: F401
from . import dylora  # noqa: F401
from . import loha  # noqa: F401
from . import lokr  # noqa: F401
from . import vera  # noqa: F401
