"""The execute phase of a tick: frames → similarity filter → VAE encode → ONE U-Net call per bucket → apply → decode.

:class:`Executor` runs on the engine's worker (the thread that owns the model) and touches only the streams the
scheduler picked. Everything that can fail because of one stream's work is caught per stream and reported through
``fail(stream, error)``: that stream ends, the others go on. A batched call (U-Net, or VAE when batched) that fails is
retried stream by stream to find whose work broke it, after the backend has restored its own state
(:func:`~streamdiff.backends.base.recover`): a failed call never leaves the shared engines broken for the others.

With whole-tick CUDA graphs (:mod:`.tick_graph`), a call whose every stream is eligible is one replay between the
filter and the decoded frames; the other calls take the path above.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..backends.base import ControlNetEngine, UNetEngine, VaeEngine, recover
from ..config import StreamConfig, StreamMode
from ..core.image import fit_frame, frame_to_tensor, from_model_range, tensor_to_frame, to_model_range
from ..models import LoadedModel
from ..models.controlnet import Preprocessor
from .batch import assemble
from .control import controlnet_extras, group_control
from .inbox import InputFrame
from .outputs import StreamOutput
from .records import StreamRecord
from .state import StreamTask
from .tick_graph import Member, TickGraphs, graphable

logger = logging.getLogger(__name__)

# The frame id of padding frames (a group completed with copies of the last frame at end of input): not output.
PADDING = type("Padding", (), {"__repr__": lambda self: "PADDING"})()


class Executor:
    """Runs one tick's work for the chosen streams on the model's engines; see the module docstring.

    The streams are the engine's :class:`~.records.StreamRecord` s. ``backends()`` gives the current (U-Net, VAE)
    engines; ``record_call(rows, padding)`` counts U-Net calls; ``take_inputs(stream, n)`` takes a stream's oldest
    ``n`` input frames (fewer at the end of input); ``fail(stream, error)`` ends one stream. ``to_host(tensor)``
    copies one device tensor to the host: the tick's ONE host synchronisation (every decoded frame of the tick
    travels in that one copy; see :meth:`_finish`). ``controlnets``: the engine's ControlNet engines by name (a
    mapping the engine keeps current: eager, or compiled with the backend), and ``preprocessors`` its control-image
    preprocessors (see :mod:`.control`). ``ticks``: the whole-tick graphs (None: none). ``host_filter``: the
    similarity filter decides on the host frames (on a GPU: no device read per stream and tick).
    """

    def __init__(
        self,
        model: LoadedModel,
        backends: Callable[[], tuple[UNetEngine, VaeEngine]],
        record_call: Callable[[int, int], None],
        batch_vae: bool,
        take_inputs: Callable[[StreamRecord, int], list[InputFrame]],
        fail: Callable[[StreamRecord, BaseException], None],
        to_host: Callable[[torch.Tensor], torch.Tensor] = torch.Tensor.cpu,
        controlnets: Mapping[str, ControlNetEngine] | None = None,
        preprocessors: Mapping[str, Preprocessor | None] | None = None,
        ticks: TickGraphs | None = None,
        host_filter: bool = False,
    ) -> None:
        self.model = model
        self.backends = backends
        self.record_call = record_call
        self.batch_vae = batch_vae
        self._take_inputs = take_inputs
        self._fail = fail
        self._to_host = to_host
        self.controlnets = controlnets if controlnets is not None else {}
        self.preprocessors = preprocessors or {}
        self.ticks = ticks
        self.host_filter = host_filter

    def run(self, calls: list[list[StreamRecord]]) -> dict[StreamRecord, StreamOutput]:
        """Execute a tick: ``calls`` lists the streams of each U-Net call (one per bucket). Their outputs."""
        tasks: dict[StreamRecord, StreamTask] = {}
        outputs: dict[StreamRecord, StreamOutput] = {}
        groups = self._take([s for call in calls for s in call], outputs)
        graphed: list[tuple[StreamRecord, torch.Tensor, tuple[Any, ...]]] = []
        if self.ticks is not None:
            for call in calls:
                self._run_graphed([s for s in call if s in groups], groups, graphed)
        self._start(groups, tasks)
        for call in calls:
            members = [(s, tasks[s]) for s in call if s in tasks]
            for round_index in range(max((t.rounds for _, t in members), default=0)):
                self._run_unet([(s, t) for s, t in members if s in tasks and round_index < t.rounds], round_index)
        self._finish(tasks, outputs, graphed)
        return outputs

    def _take(self, streams: list[StreamRecord], outputs: dict[StreamRecord, StreamOutput]
              ) -> dict[StreamRecord, _Group]:
        """Take each stream's frame group and run its similarity filter: the groups that go on (a filtered one
        gets its output here)."""
        groups: dict[StreamRecord, _Group] = {}
        for stream in streams:
            try:
                state = stream.state
                assert state is not None
                f = state.config.frame_buffer_size
                group = self._take_inputs(stream, f)
                if not group:  # draining: pad with the newest latents, no output of its own
                    groups[stream] = _Group(None, None, None, {})
                    continue
                stream.stats.frames_in += len(group)
                ids = tuple(item.frame_id for item in group) + (PADDING,) * (f - len(group))
                group += [group[-1]] * (f - len(group))  # end of input inside a group: pad with the last frame
                images = None if state.config.mode is StreamMode.TXT2IMG else torch.stack(
                    [_fit(item.image, state.config) for item in group])
                controls = self._control(state, group, images)
                model_input = None
                if images is not None:
                    if not self.host_filter:
                        model_input = self._model_input(images)
                    if self._skips(state, images, model_input):
                        stream.stats.filter_skips += len(group)
                        outputs[stream] = _output(state.last_output, ids, state.version, skipped=True)
                        continue
                groups[stream] = _Group(images, model_input, ids, controls)
            except Exception as error:  # noqa: BLE001 - this stream's work failed: it ends, the others go on
                self._fail(stream, error)
        return groups

    def _model_input(self, images: torch.Tensor) -> torch.Tensor:
        """Host frames ``[F, 3, H, W]`` in [0, 1] as the VAE encoder takes them: on the model's device and dtype,
        in [-1, 1]."""
        return to_model_range(images.to(self.model.device, self.model.dtype))

    def _skips(self, state: Any, images: torch.Tensor, model_input: torch.Tensor | None) -> bool:
        """The similarity filter's decision for a group: on the model input where it already is (the CPU), else on
        the host frames in float32 (on a GPU, deciding on the device would read a number back every tick)."""
        if model_input is not None:
            return state.filter.decide(model_input).skip
        if not state.filter.config.enabled:
            state.filter.reset()
            return False
        return state.filter.decide(to_model_range(images.float())).skip

    def _run_graphed(self, call: list[StreamRecord], groups: dict[StreamRecord, _Group],
                     graphed: list[tuple[StreamRecord, torch.Tensor, tuple[Any, ...]]]) -> None:
        """A call whose every member can be replayed as one whole-tick graph (:mod:`.tick_graph`): replayed, its
        members' groups taken out of ``groups`` and their leaving frames added to ``graphed``."""
        assert self.ticks is not None
        if not call or any(groups[s].ids is None or not graphable(s.state) for s in call):
            return
        try:
            result = self.ticks.run([Member(s.state, groups[s].images) for s in call])
        except Exception as error:  # noqa: BLE001 - the eager path runs it (and finds a failing stream there)
            logger.warning("a whole-tick CUDA graph of %d streams failed (%s: %s); running the call eagerly",
                           len(call), type(error).__name__, error)
            return
        if result is None:
            return
        program, frames = result
        self.record_call(program.rows, program.padding)
        for stream, images in zip(call, frames):
            ids = groups.pop(stream).ids
            stream.stats.unet_calls += 1
            leaving = stream.state.leaving(ids)
            if leaving is not None:
                graphed.append((stream, images, leaving))

    def _start(self, groups: dict[StreamRecord, _Group], tasks: dict[StreamRecord, StreamTask]) -> None:
        """Each group's task: frames through the VAE encoder (img2img), the seed's noise (txt2img), or the newest
        latents again (a draining stream's padding)."""
        to_encode: list[tuple[StreamRecord, torch.Tensor, _Group]] = []
        for stream, group in groups.items():
            try:
                state = stream.state
                if group.ids is None:
                    tasks[stream] = state.task(state.last_latents, None)
                elif group.images is None:
                    tasks[stream] = state.task(state.entry_latents(None), group.ids, group.controls)
                else:
                    model_input = group.model_input if group.model_input is not None else self._model_input(
                        group.images)
                    to_encode.append((stream, model_input, group))
            except Exception as error:  # noqa: BLE001
                self._fail(stream, error)
        for (stream, _, group), latents in zip(to_encode, self._vae_calls("encode", [x for _, x, _ in to_encode],
                                                                         [s for s, _, _ in to_encode])):
            if latents is not None:
                tasks[stream] = stream.state.task(stream.state.entry_latents(latents), group.ids, group.controls)
        for stream in [s for s in tasks if s.finished]:
            tasks.pop(stream)

    def _run_unet(self, members: list[tuple[StreamRecord, StreamTask]], round_index: int) -> None:
        """ONE U-Net call over the members' rows; on failure, each member alone (to find whose work fails)."""
        planned, controls = [], []
        for stream, task in members:
            try:
                planned.append((stream, task, task.plan(round_index)))
                controls.append(task.controls(round_index))
            except Exception as error:  # noqa: BLE001
                if len(planned) > len(controls):
                    planned.pop()
                self._fail(stream, error)
        if not planned:
            return
        unet = self.backends()[0]
        batch_sizes = getattr(unet, "batch_sizes", None)
        try:
            assembled = assemble([rows for _, _, rows in planned], batch_sizes)
            rows = assembled.rows
            extras = dict(rows.extras)
            if any(controls):
                extras.update(controlnet_extras(self.controlnets, rows, assembled.spans, controls))
            prediction = unet(rows.sample, rows.timesteps, rows.embeddings, **extras)
            self.record_call(assembled.rows.rows - assembled.padding, assembled.padding)
            slices = assembled.split(prediction)
        except Exception as error:  # noqa: BLE001
            recover(unet)  # a failed call may leave the backend's shape state broken (OpenVINO's CPU plugin does)
            if len(planned) == 1:
                self._fail(planned[0][0], error)
                return
            logger.warning("a batched U-Net call of %d streams failed (%s); retrying each alone", len(planned), error)
            for stream, task in [(s, t) for s, t, _ in planned]:
                self._run_unet([(stream, task)], round_index)
            return
        for (stream, task, _), prediction in zip(planned, slices):
            try:
                task.apply(round_index, prediction)
                stream.stats.unet_calls += 1
            except Exception as error:  # noqa: BLE001
                self._fail(stream, error)

    def _control(self, state: Any, group: list[InputFrame], images: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The group's control images by ControlNet name, on the model's device and dtype ({} without ControlNet)."""
        specs = state.prompt.controlnets
        if not specs:
            return {}
        last = state.control.group if state.control is not None else {}
        made = group_control(specs, group, images, last, self.preprocessors, (state.config.width,
                                                                              state.config.height))
        return {name: image.to(self.model.device, self.model.dtype) for name, image in made.items()}

    def _finish(self, tasks: dict[StreamRecord, StreamTask], outputs: dict[StreamRecord, StreamOutput],
                graphed: list[tuple[StreamRecord, torch.Tensor, tuple[Any, ...]]]) -> None:
        """Decode what leaves each Stream Batch this tick; with the frames the graphed calls decoded, to the host
        in one copy."""
        leaving: list[tuple[StreamRecord, torch.Tensor, tuple[Any, ...]]] = []
        for stream, task in tasks.items():
            if stream.finished:
                continue
            try:
                x0, ids = task.finish()
            except Exception as error:  # noqa: BLE001
                self._fail(stream, error)
                continue
            if x0 is None:
                outputs[stream] = StreamOutput(None, False, (), stream.state.version)
            else:
                leaving.append((stream, x0, ids))
        decoded = self._vae_calls("decode", [x0 for _, x0, _ in leaving], [s for s, _, _ in leaving])
        done = [(stream, ids, from_model_range(images).float())
                for (stream, _, ids), images in zip(leaving, decoded) if images is not None]
        done += [(stream, ids, images) for stream, images, ids in graphed]
        for (stream, ids, _), images in zip(done, self._host([images for _, _, images in done])):
            state = stream.state
            state.last_output = images
            output = _output(images, ids, state.version)
            stream.stats.frames_out += len(output.frame_ids)
            outputs[stream] = output

    def _host(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """``tensors`` on the host, in ONE device→host copy: flattened into one buffer, copied, split on the host."""
        if not tensors:
            return []
        flat = torch.cat([t.reshape(-1) for t in tensors])  # [sum of numel]
        host = self._to_host(flat)
        return [part.view(t.shape) for part, t in zip(torch.split(host, [t.numel() for t in tensors]), tensors)]

    def _vae_calls(self, method: str, inputs: list[torch.Tensor], streams: list[StreamRecord]
                   ) -> list[torch.Tensor | None]:
        """``vae.encode``/``decode`` of every input: one call per shape when batching, else one per stream.

        A failing batched call is retried per stream; a stream whose own call fails ends (its slot is None).
        """
        vae = self.backends()[1]
        results: list[torch.Tensor | None] = [None] * len(inputs)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, tensor in enumerate(inputs):
            groups.setdefault(tuple(tensor.shape[1:]), []).append(i)
        for members in groups.values():
            if self.batch_vae and len(members) > 1:
                try:
                    out = getattr(vae, method)(torch.cat([inputs[i] for i in members]))
                    sizes = [inputs[i].shape[0] for i in members]
                    for i, part in zip(members, torch.split(out, sizes)):
                        results[i] = part
                    continue
                except Exception as error:  # noqa: BLE001
                    recover(vae)
                    logger.warning("a batched VAE %s failed (%s); retrying each stream alone", method, error)
            for i in members:
                try:
                    results[i] = getattr(vae, method)(inputs[i])
                except Exception as error:  # noqa: BLE001
                    recover(vae)
                    self._fail(streams[i], error)
        return results


@dataclass(eq=False)
class _Group:
    """A stream's frame group on its way in: host frames ``[F, 3, H, W]`` in [0, 1] (None: txt2img, or padding),
    the model input where the filter already made it (the CPU), the frame ids (None: a draining stream's padding)
    and the control images."""

    images: torch.Tensor | None
    model_input: torch.Tensor | None
    ids: tuple[Any, ...] | None
    controls: dict[str, torch.Tensor]


def _output(images: torch.Tensor | None, ids: tuple[Any, ...], version: int, skipped: bool = False) -> StreamOutput:
    """A stream's output, without the frames that only padded a group at end of input."""
    if images is not None and PADDING in ids:
        real = [i for i, frame_id in enumerate(ids) if frame_id is not PADDING]
        images, ids = images[real], tuple(ids[i] for i in real)
    return StreamOutput(images, skipped, ids if images is not None or skipped else (), version)


def _fit(image: torch.Tensor, config: StreamConfig) -> torch.Tensor:
    """A queued frame at the stream's current size (frames queued before a size change are resized here)."""
    if tuple(image.shape[1:]) == (config.height, config.width):
        return image
    return frame_to_tensor(fit_frame(tensor_to_frame(image[None])[0], config.width, config.height))[0]
