"""Error replies of stepadapt's Triton models, and the one convention for a code crossing BLS.

A BLS caller reads every error as INTERNAL, whatever code the callee set, so an
answer meant to be relayed (the fused ``router`` answering the ``generate``
front) carries its code at the head of the message; :func:`unrelay` takes it
off again. Imported only inside Triton's python backend (it needs pb_utils).
"""

import triton_python_backend_utils as pb_utils

CODES = ("INVALID_ARG", "INTERNAL", "UNAVAILABLE", "CANCELLED")


def error(msg: str, code: str = "INVALID_ARG", relayed: bool = False):
    """An error response with ``code`` (``relayed``: the code also at the head of the message)."""
    if relayed:
        msg = f"{code}: {msg}"
    try:
        return pb_utils.InferenceResponse(
            error=pb_utils.TritonError(msg, getattr(pb_utils.TritonError, code))
        )
    except (AttributeError, TypeError):  # older python backends have no error codes
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(msg))


def unrelay(message: str) -> tuple[str, str]:
    """(code, message) of a relayed error; anything else is Triton's and ours: INTERNAL, as it is."""
    code, sep, msg = message.partition(": ")
    return (code, msg) if sep and code in CODES else ("INTERNAL", message)


def internal(e: Exception, relayed: bool = False):
    """Our failure: a short line for the client, the details in the server log."""
    pb_utils.Logger.log_error(f"generate: {type(e).__name__}: {e}")
    return error(f"internal error ({type(e).__name__}); see the server log", "INTERNAL", relayed)
