"""The bundle manifest's schema: a manifest is untrusted input.

Checked before anything is built from it, so a hand-edited or hostile manifest
fails with one line naming the field instead of an ``IndexError`` deep inside,
and no path in it can point outside the bundle (the checksums sit in the same
file, so they cannot protect against that themselves).
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Any

from stepadapt import StepadaptError
from stepadapt.conditioning import conditioning_of
from stepadapt.kinds import CLASS_GAUSSIAN, DEFAULT, KINDS

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
NAME_FILE = re.compile(r"^(?!\.)[A-Za-z0-9_.-]{1,128}$")  # a file name, no directories
SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _fail(field: str, want: str, got: Any) -> None:
    shown = repr(got)
    raise StepadaptError(f"bundle manifest: {field} must be {want}, got {shown[:60]}")


def _int(d: dict, key: str, field: str, lo: int = 0) -> int:
    v = d.get(key)
    if not _integer(v) or v < lo:
        _fail(f"{field}{key}", f"an integer >= {lo}", v)
    return v


def _integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def safe_relative(path: Any, field: str) -> str:
    """A relative POSIX path that stays inside the bundle (no absolute paths, no '..')."""
    if not isinstance(path, str) or not path or "\x00" in path or "\\" in path:
        _fail(field, "a relative path inside the bundle", path)
    p = PurePosixPath(path)
    if p.is_absolute() or ".." in p.parts:
        _fail(field, "a relative path inside the bundle", path)
    return path


def _file(d: dict, key: str, sha_key: str, field: str) -> None:
    safe_relative(d.get(key), f"{field}{key}")
    if not isinstance(d.get(sha_key), str) or not SHA256.match(d[sha_key]):
        _fail(f"{field}{sha_key}", "a sha256 hex digest", d.get(sha_key))


def validate_manifest(d: dict[str, Any]) -> None:
    """Raise a one-line StepadaptError for the first field that is missing, mistyped or unsafe."""
    for key, kind in (("base_config", dict), ("scheduler", dict), ("experts", list)):
        if not isinstance(d.get(key), kind):
            _fail(key, f"a {'JSON object' if kind is dict else 'list'}", d.get(key))
    T = _int(d["scheduler"], "num_train_timesteps", "scheduler.", lo=2)
    shape = d.get("sample_shape")
    if not (isinstance(shape, list) and len(shape) == 3 and all(_integer(v) and v > 0 for v in shape)):
        _fail("sample_shape", "three positive integers [C, H, W]", shape)
    _int(d, "base_macs", "", lo=1)
    _int(d, "base_params", "", lo=1)
    if not d["experts"]:
        raise StepadaptError("bundle manifest: experts is empty (the bundle has no experts)")
    last = d["experts"][-1] if isinstance(d["experts"][-1], dict) else {}
    top = KINDS.get(last.get("kind", DEFAULT))
    validate_recommended(d.get("recommended"), top is not None and top.jumps)
    for key in ("base", "data"):
        record = d.get(key)
        if record is None:
            continue
        if not isinstance(record, dict):
            _fail(key, "a JSON object or null", record)
        if not isinstance(record.get("sha256"), str) or not SHA256.match(record["sha256"]):
            _fail(f"{key}.sha256", "a sha256 hex digest", record.get("sha256"))
    cfg = d["base_config"]
    n = cfg.get("num_class_embeds")
    if n is not None and not (_integer(n) and n >= 2):
        _fail("base_config.num_class_embeds", "null or an integer >= 2 (the classes and the null class)", n)
    cross = cfg.get("cross_attention_dim")
    widths = cross if isinstance(cross, list) and cross else [cross]
    if cross is not None and not all(_integer(w) and w > 0 for w in widths):
        _fail("base_config.cross_attention_dim", "null, a positive integer or a list of them", cross)
    classes = conditioning_of(cfg).classes
    names = d.get("class_names")
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        _fail("class_names", "a list of strings or null", names)
    if names is not None and classes and len(names) != classes:
        _fail("class_names", f"{classes} names (the base's classes)", names)
    _pipeline(d.get("pipeline"))
    onnx_parts = d.get("surround_onnx")
    if onnx_parts is not None:
        if not isinstance(onnx_parts, dict) or any(
            p not in ("text_encoder", "vae_decoder") for p in onnx_parts
        ):
            _fail("surround_onnx", "null or an object of text_encoder, vae_decoder", onnx_parts)
        for part, r in onnx_parts.items():
            if not isinstance(r, dict):
                _fail(f"surround_onnx.{part}", "a JSON object", r)
            _file(r, "path", "sha256", f"surround_onnx.{part}.")
    for i, e in enumerate(d["experts"]):
        f = f"experts[{i}]."
        if not isinstance(e, dict):
            _fail(f"experts[{i}]", "a JSON object", e)
        if not isinstance(e.get("name"), str) or not NAME.match(e["name"]):
            _fail(f"{f}name", "1-64 of A-Z a-z 0-9 _ -", e.get("name"))
        kind = KINDS.get(e.get("kind", DEFAULT))
        if kind is None:
            _fail(f"{f}kind", f"one of {', '.join(KINDS)}", e.get("kind"))
        if kind is CLASS_GAUSSIAN and not classes:
            others = ", ".join(k for k in KINDS if k != CLASS_GAUSSIAN.name)
            _fail(f"{f}kind", f"one of {others} (the base has no classes)", kind.name)
        ts = e.get("timesteps")
        if not (isinstance(ts, list) and len(ts) == 2 and all(map(_integer, ts)) and 0 <= ts[0] < ts[1] <= T):
            _fail(f"{f}timesteps", f"two integers 0 <= lo < hi <= {T}", ts)
        snr = e.get("snr_db")
        if not (isinstance(snr, list) and len(snr) == 2 and all(_number(v) for v in snr)):
            _fail(f"{f}snr_db", "two numbers", snr)
        for key in ("target_macs", "macs", "params"):
            _int(e, key, f)
        for path_field, sha_field in kind.files:
            _file(e, path_field, sha_field, f)
        for key in ("onnx", "trt"):
            if e.get(key) is not None:
                if not isinstance(e[key], dict):
                    _fail(f"{f}{key}", "a JSON object or null", e[key])
                _file(e[key], "path", "sha256", f"{f}{key}.")
        for key in ("parent", "importance"):
            if e.get(key) is not None and not isinstance(e[key], str):
                _fail(f"{f}{key}", "a string", e[key])
        if e.get("proxy_loss") is not None and not _number(e["proxy_loss"]):
            _fail(f"{f}proxy_loss", "a number or null", e["proxy_loss"])


def _pipeline(parts: Any) -> None:
    """``pipeline``: null, or {part: {file name: sha256}} for the surround parts a bundle copies."""
    if parts is None:
        return
    if not isinstance(parts, dict) or any(p not in ("vae", "text_encoder", "tokenizer") for p in parts):
        _fail("pipeline", "null or an object of vae, text_encoder, tokenizer", parts)
    for part, files in parts.items():
        if not isinstance(files, dict) or not files:
            _fail(f"pipeline.{part}", "an object of file names and sha256 digests", files)
        for name, sha in files.items():
            if not NAME_FILE.match(name) or not isinstance(sha, str) or not SHA256.match(sha):
                _fail(f"pipeline.{part}.{name}", "a plain file name with a sha256 hex digest", sha)


def validate_recommended(r: Any, jump_possible: bool = True) -> None:
    """The manifest's ``recommended`` sampling setting (``stepadapt tune``): null or a JSON object
    with a sampler spec stepadapt knows, a step count and whether to jump."""
    if r is None:
        return
    from stepadapt.solvers import Solver

    if not isinstance(r, dict):
        _fail("recommended", "a JSON object or null", r)
    if not isinstance(r.get("sampler"), str):
        _fail("recommended.sampler", "a sampler spec string", r.get("sampler"))
    solver = Solver.parse(r["sampler"])
    _int(r, "steps", "recommended.", lo=1)
    if not isinstance(r.get("jump", False), bool):
        _fail("recommended.jump", "true or false", r.get("jump"))
    if r.get("jump") and not (jump_possible and solver.jumps):
        raise StepadaptError(
            f"bundle manifest: recommended.jump with {solver.name} needs a solver that can start "
            "mid-schedule and a Gaussian expert on the noisy end"
        )
