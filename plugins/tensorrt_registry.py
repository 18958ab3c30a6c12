"""`tensorrt` with the trt_edgellm plugins registered: building an engine and deserializing one both need them.

It lives in `plugins` because both the builder and the runtime call it, and the runtime may not import the builder.
TensorRT comes only from NVIDIA's package index, so it is imported here, when asked for, never at module level.
"""

from __future__ import annotations

from contract.errors import InputError


def import_tensorrt(who: str):
    """`tensorrt`, with both trt_edgellm plugins registered in this process; `who` starts the error message."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise InputError(f"{who}: expected the tensorrt Python package (pip install --extra-index-url "
                         f"https://pypi.nvidia.com tensorrt), found none ({e})") from e
    from plugins.attention import trt_plugin as attention_plugin
    from plugins.fp8_gather import trt_plugin as fp8_gather_plugin

    for plugin in (attention_plugin, fp8_gather_plugin):
        if not plugin.register():
            raise InputError(f"{who}: expected tensorrt.plugin (TensorRT >= 10.6) to register "
                             f"{plugin.PLUGIN_ID}, found tensorrt {trt.__version__} without it")
    return trt
