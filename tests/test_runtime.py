"""kd_jax.runtime: the process settings every command and this suite use."""
import os

import jax
import jax.numpy as jnp
import pytest

from kd_jax import runtime


@pytest.mark.parametrize("current, expected", [
    ("", "--xla_cpu_experimental_ynn_fusion_type="),
    ("--xla_force_host_platform_device_count=8",
     "--xla_force_host_platform_device_count=8 "
     "--xla_cpu_experimental_ynn_fusion_type="),
    # The user's value wins; their spacing is kept.
    ("--xla_cpu_experimental_ynn_fusion_type=-invalid",
     "--xla_cpu_experimental_ynn_fusion_type=-invalid"),
    ("  --xla_cpu_experimental_ynn_fusion_type=dot  ",
     "  --xla_cpu_experimental_ynn_fusion_type=dot  "),
])
def test_xla_flags_adds_only_what_the_user_did_not_set(current, expected):
  assert runtime.xla_flags(current) == expected


def test_configure_is_idempotent():
  before = os.environ["XLA_FLAGS"]
  runtime.configure()
  assert os.environ["XLA_FLAGS"] == before
  assert before.count("xla_cpu_experimental_ynn_fusion_type") == 1


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU only")
def test_cpu_convolutions_compile_without_ynnpack_fusions():
  # conftest called runtime.configure() before the backend started; jaxlib
  # 0.10 would otherwise put this convolution in a YNNPACK fusion.
  if ("--xla_cpu_experimental_ynn_fusion_type="
      not in os.environ["XLA_FLAGS"].split()):
    pytest.skip("XLA_FLAGS chose its own YNN fusion types")
  conv = jax.jit(lambda x, w: jax.nn.relu(jax.lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))))
  hlo = conv.lower(jnp.ones((16, 64, 64, 32)),
                   jnp.ones((3, 3, 32, 32))).compile().as_text()
  assert "convolution" in hlo
  assert "__ynn_fusion" not in hlo


def test_retain_freed_memory_on_glibc():
  import platform  # pylint: disable=import-outside-toplevel

  if platform.libc_ver()[0] != "glibc":
    assert runtime.retain_freed_memory() is False
  else:
    assert runtime.retain_freed_memory() is True
