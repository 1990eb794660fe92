"""Flax linen models. Every model's `__call__(x, *, train)` returns
`(logits, features)`: `features` is a flat dict of named intermediate arrays
(NHWC maps, NLD tokens, `"embedding"` for a pooled vector). See each module's
docstring for its feature names.
"""
from kd_jax.models.registry import accepts, build, names, register
from kd_jax.models.summary import default_input, summary  # noqa: E402

# Importing a module registers its models.
from kd_jax.models import unet  # noqa: F401,E402
from kd_jax.models import resnet  # noqa: F401,E402
from kd_jax.models import pspnet  # noqa: F401,E402
from kd_jax.models import mobilenetv2  # noqa: F401,E402
from kd_jax.models import espnet  # noqa: F401,E402
from kd_jax.models import multitask  # noqa: F401,E402
from kd_jax.models import discriminator  # noqa: F401,E402
from kd_jax.models import squeeze_unet  # noqa: F401,E402
from kd_jax.models import transunet  # noqa: F401,E402
from kd_jax.models import vit  # noqa: F401,E402
from kd_jax.models import efficientvit  # noqa: F401,E402
from kd_jax.models import medtex  # noqa: F401,E402
from kd_jax.models import medtex_baselines  # noqa: F401,E402
