"""nsad — Python client of the nsad selection-attention daemon.

    import nsad
    with nsad.Client(socket="/run/nsad/nsad.sock", labels={"job": "rl"}) as c:
        o, lse = c.forward(q, k, v, block_ids, block_size=64)   # numpy
        print(c.last_reply.path, c.last_reply.flags_epoch)

    from nsad.torch import selection_attention                 # needs torch
    o, lse = selection_attention(q, k, v, block_ids, block_size=64)
    o.sum().backward()

The numpy part needs only numpy (and libnsaclient); torch is imported only by
nsad.torch. See docs/PYTHON.md.
"""
from .client import (NsadError, Reply, Client, ShmRegion, default_client, set_default_client,
                     forward, backward, shapes_of)
from . import _lib

__version__ = "0.1.0"

ERROR_CODES = ("bad_request", "unknown_method", "not_found", "out_of_bounds",
               "invalid_selection", "unsupported", "busy", "permission_denied",
               "protocol_version", "device_error", "internal")
FLAGS = ("NSA_SEL_VARLEN_V2", "NSA_SEL_VARLEN_MIN_L", "NSA_USE_SEL_VARLEN", "NSA_SEL_SHADOW_RATE")
PATHS = ("varlen_v2", "varlen_v1", "packed")


def selection_attention(*args, **kw):
    """Lazy alias of nsad.torch.selection_attention (imports torch)."""
    from .torch import selection_attention as f
    return f(*args, **kw)


__all__ = ["NsadError", "Reply", "Client", "ShmRegion", "default_client", "set_default_client",
           "forward", "backward", "selection_attention", "shapes_of", "ERROR_CODES", "FLAGS",
           "PATHS", "__version__"]
