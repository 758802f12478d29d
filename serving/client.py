"""A small client for the generate endpoints (tritonclient, HTTP or gRPC).

Over gRPC a request given up on (its timeout, Ctrl-C) is cancelled on the
server, which stops working on it within a step. Triton's HTTP front end has no
cancellation: an abandoned HTTP request runs on until it ends or reaches the
server's time limit (``stepadapt serve --max-seconds``).
"""

from __future__ import annotations

import queue
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from stepadapt import StepadaptError


@dataclass
class GenerateRequest:
    """What to ask the endpoint for; ``None`` leaves the choice to the served bundle's recommended
    setting (``stepadapt tune``), or 50 DDIM steps without one."""

    num_images: int = 16
    steps: int | None = None
    seed: int = 0
    sampler: str | None = None  # a solver spec: "unipc", "dpm++2m:thresholding", "ddim:eta=0.5", ...
    eta: float | None = None
    jump: bool | None = None
    # A class-conditional bundle: one label per image (the bundle's null label, its class count,
    # for an unconditional image) and the classifier-free guidance scale (None: 1, no guidance).
    class_labels: Sequence[int] | None = None
    guidance_scale: float | None = None
    # Which served bundle (``stepadapt serve NAME=DIR ...``); None: the server's default (the first).
    budget: str | None = None
    # A text-to-image bundle: the prompt of every image, and what guidance steers away from
    # (guidance_scale None: Stable Diffusion's 7.5).
    prompt: str | None = None
    negative_prompt: str | None = None


@dataclass
class Generated:
    """The endpoint's answer: the images and what served them (an SLO may have served them with
    fewer steps or a smaller bundle than asked: ``degraded``)."""

    images: np.ndarray
    bundle: str
    steps: int
    sampler: str
    degraded: bool
    truncated: bool = False  # the prompt was longer than the tokenizer's limit and was cut


OUTPUTS = ("images", "served_bundle", "served_steps", "served_sampler", "degraded", "prompt_truncated")


def _text(a: np.ndarray) -> str:
    v = a.reshape(-1)[0]
    return v.decode() if isinstance(v, bytes) else str(v)


def _generated(res) -> Generated:
    return Generated(
        images=res.as_numpy("images"), bundle=_text(res.as_numpy("served_bundle")),
        steps=int(res.as_numpy("served_steps").reshape(-1)[0]), sampler=_text(res.as_numpy("served_sampler")),
        degraded=bool(res.as_numpy("degraded").reshape(-1)[0]),
        truncated=_flag(res, "prompt_truncated"),
    )  # fmt: skip


def _flag(res, name: str) -> bool:
    a = res.as_numpy(name)
    return bool(a is not None and a.reshape(-1)[0])


def _bytes(text: str | None) -> np.ndarray | None:
    return None if text is None else np.array([text.encode()], dtype=np.object_)


INT32 = np.iinfo(np.int32)


def _labels(labels: Sequence[int] | None) -> np.ndarray | None:
    """The labels as the endpoint's INT32 [N]; whether they fit the bundle is the server's to say."""
    if labels is None:
        return None
    a = np.asarray(list(labels))
    if a.size and (a.dtype.kind not in "iu" or a.min() < INT32.min or a.max() > INT32.max):
        raise StepadaptError(f"class labels must be whole numbers, got {list(labels)[:8]}")
    return a.astype(np.int32).reshape(-1)


def _inputs(mod, req: GenerateRequest) -> list:
    scale = req.guidance_scale
    values = [
        ("seed", np.array([req.seed], dtype=np.int64), "INT64"),
        ("num_images", np.array([req.num_images], dtype=np.int32), "INT32"),
        ("steps", None if req.steps is None else np.array([req.steps], dtype=np.int32), "INT32"),
        (
            "sampler",
            None if req.sampler is None else np.array([req.sampler.encode()], dtype=np.object_),
            "BYTES",
        ),
        ("eta", None if req.eta is None else np.array([req.eta], dtype=np.float32), "FP32"),
        ("jump", None if req.jump is None else np.array([req.jump], dtype=np.bool_), "BOOL"),
        ("class_labels", _labels(req.class_labels), "INT32"),
        ("guidance_scale", None if scale is None else np.array([scale], dtype=np.float32), "FP32"),
        ("budget", _bytes(req.budget), "BYTES"),
        ("prompt", _bytes(req.prompt), "BYTES"),
        ("negative_prompt", _bytes(req.negative_prompt), "BYTES"),
    ]
    out = []
    for name, arr, dtype in values:
        if arr is None:
            continue
        t = mod.InferInput(name, list(arr.shape), dtype)
        t.set_data_from_numpy(arr)
        out.append(t)
    return out


def _message(e: Exception) -> str:
    msg = getattr(e, "message", None)
    text = msg() if callable(msg) else str(e)
    text = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    text = re.sub(r"^\[request id: [^\]]*\] ", "", text)
    if "maximum queue size" in text or "timeout expired" in text.lower():
        return f"the server is busy, retry later ({text})"
    return text


def _refused(e: Exception) -> StepadaptError:
    return StepadaptError(f"server refused the request: {_message(e)}")


class Endpoint:
    """One connection to the ``generate`` model, reused across requests (HTTP or gRPC)."""

    def __init__(self, url: str, protocol: str = "http", timeout: float = 600.0):
        if protocol == "http":
            import tritonclient.http as mod

            self.client = mod.InferenceServerClient(url, connection_timeout=timeout, network_timeout=timeout)
        elif protocol == "grpc":
            import tritonclient.grpc as mod

            self.client = mod.InferenceServerClient(url)
        else:
            raise StepadaptError(f"unknown protocol {protocol!r}; use http or grpc")
        self.url, self.mod, self.protocol, self.timeout = url, mod, protocol, timeout

    def generate(self, req: GenerateRequest) -> np.ndarray:
        """Images (uint8, N x H x W x C)."""
        return self.infer(req).images

    def infer(self, req: GenerateRequest) -> Generated:
        """The images and what served them."""
        from tritonclient.utils import InferenceServerException

        inputs, outputs = _inputs(self.mod, req), [self.mod.InferRequestedOutput(n) for n in OUTPUTS]
        try:
            if self.protocol == "grpc":
                res = self._grpc(inputs, outputs)
            else:
                res = self.client.infer("generate", inputs, outputs=outputs)
        except StepadaptError:
            raise
        except InferenceServerException as e:
            raise _refused(e) from None
        except Exception as e:  # connection refused, DNS, timeouts
            if isinstance(e, TimeoutError) or "timed out" in str(e):
                raise StepadaptError(
                    f"no answer from Triton at {self.url} in {self.timeout:g}s (HTTP cannot cancel: the "
                    "server works on to its time limit; gRPC cancels)"
                ) from None
            raise StepadaptError(f"cannot reach Triton at {self.url}: {_message(e)}") from None
        return _generated(res)

    def submit(self, req: GenerateRequest, done: Callable[[Generated | StepadaptError], None]) -> None:
        """Send ``req`` without waiting (gRPC): ``done`` gets the answer or the refusal, on another
        thread. What open-loop load needs: arrivals do not wait for answers."""
        if self.protocol != "grpc":
            raise StepadaptError("submit needs a gRPC endpoint (protocol='grpc')")
        inputs, outputs = _inputs(self.mod, req), [self.mod.InferRequestedOutput(n) for n in OUTPUTS]

        def callback(result, error) -> None:
            if error is not None:
                done(_refused(error))
            else:
                try:
                    done(_generated(result))
                except Exception as e:  # noqa: BLE001 - a malformed answer is the caller's to see
                    done(StepadaptError(f"unreadable answer: {e}"))

        self.client.async_infer("generate", inputs, callback=callback, outputs=outputs)

    def _grpc(self, inputs: list, outputs: list):
        """One call that the server is told to drop if we stop waiting (timeout, Ctrl-C)."""
        done: queue.Queue = queue.Queue()
        call = self.client.async_infer(
            "generate", inputs, callback=lambda result, error: done.put((result, error)), outputs=outputs
        )
        try:
            result, error = done.get(timeout=self.timeout)
        except queue.Empty:
            call.cancel()
            raise StepadaptError(
                f"no answer from Triton at {self.url} in {self.timeout:g}s (request cancelled)"
            ) from None
        except KeyboardInterrupt:
            call.cancel()
            raise
        if error is not None:
            raise error
        return result

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> Endpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def generate(url: str, req: GenerateRequest, protocol: str = "http", timeout: float = 600.0) -> np.ndarray:
    """Images (uint8, N x H x W x C) from the ``generate`` model, over a connection of its own."""
    with Endpoint(url, protocol, timeout) as endpoint:
        return endpoint.generate(req)


def generate_stream(
    url: str,
    req: GenerateRequest,
    on_step: Callable[[int, int, str], None] | None = None,
    timeout: float = 600.0,
) -> np.ndarray:
    """Stream from ``generate_stream`` over gRPC: ``on_step(step, t, expert)``, then the images."""
    import tritonclient.grpc as mod

    results: queue.Queue = queue.Queue()
    client = mod.InferenceServerClient(url)
    images = None
    try:
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        client.async_stream_infer("generate_stream", _inputs(mod, req), enable_empty_final_response=True)
        while True:
            try:
                result, error = results.get(timeout=timeout)
            except queue.Empty:
                msg = f"no message from the server in {timeout:.0f}s (request cancelled)"
                raise StepadaptError(msg) from None
            if error is not None:
                raise _refused(error)
            resp = result.get_response()
            if result.as_numpy("images") is not None:
                images = result.as_numpy("images")
            elif result.as_numpy("step") is not None and on_step is not None:
                expert = result.as_numpy("expert")[0]
                on_step(
                    int(result.as_numpy("step")[0]),
                    int(result.as_numpy("timestep")[0]),
                    expert.decode() if isinstance(expert, bytes) else str(expert),
                )
            final = resp.parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                break
    except StepadaptError:
        raise
    except Exception as e:
        raise StepadaptError(f"cannot stream from Triton at {url}: {_message(e)}") from None
    finally:  # given up on (timeout, Ctrl-C, an error): the server drops the request at its next step
        client.stop_stream(cancel_requests=images is None)
        client.close()
    if images is None:
        raise StepadaptError("the stream ended without images")
    return images
