"""Triton python-backend model: the router (``router`` in the fused layout, ``generate`` in bls,
``generate_stream`` in both).

Runs stepadapt's own sampling loop (imported, not copied) over one bundle or several of the same
base (``serving/served.py``: a request's ``budget`` picks one), each with a Router whose experts
are onnxruntime sessions in this process (``experts: local``, the fused layout: no hop per step)
or BLS calls to ``expert_<name>`` (``experts: bls``: each expert its own Triton model, e.g.
TensorRT on a GPU). Three ways to schedule:

- ``scheduling: step`` (the fused layout's router by default; decoupled): the step engine
  (``serving/steploop.py``): requests join and leave at every step boundary, each step runs each
  expert once for the rows of every request at its timesteps; with an SLO, admission decides at
  what offer a request runs, or refuses it at once.
- lockstep (``serving --scheduling lockstep``; the bls ``generate``): the requests Triton's dynamic
  batcher hands over together that ask for the same bundle and setting run as one batch to the end
  (``sample_together``); one arriving meanwhile waits for the whole batch.
- ``generate_stream`` (decoupled): one request at a time, a message per model evaluation.

Each request still gets the images it would get alone. A request that leaves out ``sampler``,
``steps`` or ``jump`` gets its bundle's recommended setting (``stepadapt tune``). A
class-conditional bundle takes ``class_labels`` and ``guidance_scale``
(``stepadapt.serving.condition``); guidance wraps the Router, so a step is still one call per
expert. Between steps every request is looked at (``cancel.Watch``): cancelled by its client
(directly, or through the front's mark), past the server's time limit, or the server stopping;
such a request gets its error and costs nothing from then on.
"""

import sys
from pathlib import Path

# The stepadapt this repository was written with, copied beside it: a stock Triton needs only the
# packages stepadapt imports, not stepadapt itself (and an installed one cannot disagree with it).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))

import os
from collections import defaultdict

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from stepadapt.serving.cancel import Stopped, Watch
from stepadapt.serving.model_args import model_config
from stepadapt.serving.replies import error, internal
from stepadapt.serving.served import load_bundles, pick, served_response

import stepadapt
from stepadapt import StepadaptError
from stepadapt.sampling import sample_images, sample_together


class TritonPythonModel:
    def initialize(self, args):
        cfg, params = model_config(args)
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        self.max_images = int(params.get("max_images", "64"))
        self.max_seconds = float(params.get("max_seconds", "600"))
        self.bundles = load_bundles(version_dir, params, local=params.get("experts", "bls") == "local")
        pb_utils.Logger.log_info(f"{cfg['name']}: stepadapt from {os.path.dirname(stepadapt.__file__)}")
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(cfg)
        self.batched = int(cfg.get("max_batch_size", 0)) > 0  # then every tensor has a leading 1
        torch.set_num_threads(1)
        self.loop = None
        if params.get("scheduling") == "step":
            from stepadapt.admission import Slo
            from stepadapt.serving.steploop import StepLoop

            slo = Slo.from_json(params["slo"]) if params.get("slo") else None
            self.loop = StepLoop(
                cfg["name"], self.bundles, max_rows=int(params.get("max_rows", self.max_images)),
                step_rows=int(params["step_rows"]) if params.get("step_rows") else None,
                max_seconds=self.max_seconds, slo=slo, conditions=self._null_condition,
            )  # fmt: skip

    def _null_condition(self, name, n):
        """Rows calibration runs a bundle's experts on: the null class, the empty text, or none."""
        return self.bundles[name].null_condition(n)

    def finalize(self):
        if self.loop is not None:
            self.loop.stop()

    def execute(self, requests):
        if self.loop is not None:
            for r in requests:
                self.loop.submit(r)
            return None
        if self.decoupled:
            for r in requests:
                self._stream(r)
            return None
        responses = [None] * len(requests)
        groups = defaultdict(list)  # (bundle, setting) -> [(index, ask, watch)]
        for i, r in enumerate(requests):
            try:
                bundle = pick(self.bundles, r)
                ask = bundle.ask(r)
                groups[bundle.name, ask.setting].append(
                    (i, ask, Watch(r.request_id(), self.max_seconds, r.is_cancelled))
                )
            except StepadaptError as e:
                responses[i] = error(str(e), relayed=self.batched)
            except Exception as e:  # noqa: BLE001 - one bad request must not fail the others
                responses[i] = internal(e, self.batched)
        for (name, setting), members in groups.items():
            for chunk in self._chunks(members):
                self._run(self.bundles[name], chunk, responses, setting)
        return responses

    def _run(self, bundle, chunk, responses, setting):
        """One lockstep batch; if it fails, each request is tried alone so only its culprit fails."""

        def stopped():
            return [w.check() is not None for *_, w in chunk]

        try:
            images = sample_together(
                bundle.denoiser, bundle.scheduler, bundle.shape, [(a.n, a.seed, a.cond) for _, a, _ in chunk],
                steps=setting.steps, sampler=setting.sampler, stopped=stopped,
                jump=bundle.jump() if setting.jump else None, decode=bundle.decode,
            )  # fmt: skip
        except Exception as e:  # noqa: BLE001
            if len(chunk) > 1:
                for member in chunk:
                    self._run(bundle, [member], responses, setting)
                return
            ours = isinstance(e, StepadaptError)  # a message meant for the user, still our failure
            responses[chunk[0][0]] = (
                error(str(e), "INTERNAL", self.batched) if ours else internal(e, self.batched)
            )
            return
        for (i, ask, watch), im in zip(chunk, images, strict=True):
            if im is None:
                responses[i] = error(str(watch.stopped), watch.stopped.code, self.batched)
            else:
                responses[i] = served_response(im, bundle.name, setting, False, self.batched, ask.truncated)

    def _chunks(self, members):
        """Consecutive runs of requests whose images together fit one batch."""
        chunk, total = [], 0
        for m in members:
            if chunk and total + m[1].n > self.max_images:
                yield chunk
                chunk, total = [], 0
            chunk.append(m)
            total += m[1].n
        if chunk:
            yield chunk

    def _stream(self, request):
        sender = request.get_response_sender()
        watch = Watch(request.request_id(), self.max_seconds, sender.is_cancelled)
        bundle = None

        def progress(i, t, x):
            if watch.check() is not None:
                raise watch.stopped
            expert = bundle.names[bundle.router.index(t)]
            sender.send(
                pb_utils.InferenceResponse(
                    [
                        pb_utils.Tensor("step", np.array([i + 1], dtype=np.int32)),
                        pb_utils.Tensor("timestep", np.array([round(t)], dtype=np.int32)),
                        pb_utils.Tensor("expert", np.array([expert.encode()], dtype=np.object_)),
                    ]
                )
            )

        try:
            bundle = pick(self.bundles, request)
            a = bundle.ask(request)
            images = sample_images(
                bundle.denoiser, bundle.scheduler, bundle.shape, a.n, steps=a.setting.steps,
                sampler=a.setting.sampler, seed=a.seed, batch=self.max_images, callback=progress,
                jump=bundle.jump() if a.setting.jump else None, cond=a.cond, decode=bundle.decode,
            )  # fmt: skip
            last = served_response(images, bundle.name, a.setting, False, truncated=a.truncated)
        except Stopped as e:
            last = error(str(e), e.code)
        except StepadaptError as e:
            last = error(str(e))
        except Exception as e:  # noqa: BLE001
            last = internal(e)
        try:
            sender.send(last, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception as e:  # noqa: BLE001 - the client went away; nobody is left to tell
            pb_utils.Logger.log_warn(f"generate_stream: final message not delivered: {e}")
