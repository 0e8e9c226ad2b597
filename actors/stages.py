"""What the split placement's actors run: the stages of a lane (actors/lanes.py), a chunk of guided steps at a time.

The prior actor drives `cdm_dist.chains.mlgd.guided_step` for each micro-batch it holds: it runs a step up to its
gradient request, hands the request to the sampler actor, and keeps the paused step until the answer comes back. The
driver sends one SlotPlan per slot and chunk, and gets back a SlotOutput: the chunk's checkpoint and losses, or the
result.

    prior.stage_prior -> sampler.stage_sampler -> prior.stage_prior -> ... -> prior.stage_end
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cdm_dist.chains.mlgd import ChainState, GradAnswer, GradRequest, GuidedStep, begin_step, finish_step, guided_step
from cdm_dist.driver.campaign import CampaignConfig, MicroBatch
from cdm_dist.driver.execution import Checkpoint, Chunk, MicroBatchResult
from cdm_dist.driver.worker import ChainWorker


@dataclass
class SlotPlan:
    """The driver's request for one in-flight slot of a split chunk: advance the micro-batch to step `until` (from
    `checkpoint` when given, else from the state the prior holds), or evaluate it (finish)."""

    batch: MicroBatch
    until: int
    checkpoint: Checkpoint | None = None
    finish: bool = False
    start: bool = False  # the micro-batch's first plan: start from x_T when no checkpoint is given
    checkpoint_step: int = 0  # the step the micro-batch stands at (the driver's view), for timing estimates


@dataclass
class Relay:
    """What one stage hands the next, actor to actor: a gradient request (prior -> sampler), its answer (sampler
    -> prior), the final state to evaluate, or the evaluated result."""

    batch: MicroBatch
    step: int
    request: GradRequest | None = None
    answer: GradAnswer | None = None
    final: Checkpoint | None = None
    result: MicroBatchResult | None = None


@dataclass
class SlotOutput:
    """What the driver gets back for a slot: the chunk (at a checkpoint boundary) or the finished result."""

    key: tuple[str, int]
    step: int
    chunk: Chunk | None = None
    result: MicroBatchResult | None = None


@dataclass
class Resident:
    """A micro-batch's chain state held by the prior between chunks."""

    state: ChainState
    first: int  # the step the current chunk began at
    losses: list[torch.Tensor] = field(default_factory=list)  # (B,) per step taken in this chunk
    paused: GuidedStep | None = None  # the step waiting for the sampler's answer
    until: int = 0
    batch: MicroBatch | None = None


class LostStepError(RuntimeError):
    """The prior lost a micro-batch's state (its actor restarted); the lane restarts it from its checkpoint."""


class LaneWorker(ChainWorker):
    """A ChainWorker that also runs the lane stages of its role (prior or sampler)."""

    def __init__(self, config: CampaignConfig, role: str = "both", device: str | None = None) -> None:
        super().__init__(config, role, device)
        self.residents: dict[tuple[str, int], Resident] = {}
        # x̂0 and gradients stay on the device when compiled graphs move them accelerator to accelerator
        self.device_messages = self.device.type == "cuda" and config.resources.transport == "compiled"

    def stage_prior(self, message: SlotPlan | Relay | None) -> Relay | None:
        """Prior: finish the step the sampler answered, then begin the next one (up to its gradient request, or the
        whole step when it is unguided). A SlotPlan starts the chunk (loading a checkpoint if given)."""
        if message is None:
            return None
        with self.busy():
            if isinstance(message, SlotPlan):
                resident = self._load(message)
                if message.finish:
                    return Relay(message.batch, resident.state.step, final=resident.state.checkpoint())
            elif message.result is not None:  # a finished micro-batch passes through
                return message
            else:
                resident = self._finish_step(message)
            return self._begin_step(resident)

    def stage_sampler(self, relay: Relay | None) -> Relay | None:
        """Sampler: the answer to a gradient request, or the final evaluation; anything else passes."""
        if relay is None or (relay.request is None and relay.final is None):
            return relay
        if relay.final is not None:  # finish counts its own busy time
            return Relay(relay.batch, relay.step, result=self.finish(relay.batch, relay.final))
        with self.busy():
            answer = self.sampler_side(relay.batch).matching_grad(relay.request)
        return Relay(relay.batch, relay.step, answer=answer)

    def stage_end(self, relay: Relay | None) -> SlotOutput | None:
        """Prior: the chunk's last step finished; returns the chunk (checkpoint + losses), or the result with
        prior_fit."""
        if relay is None:
            return None
        if relay.result is not None:  # add_prior_fit counts its own busy time
            result = self.add_prior_fit(relay.batch, relay.result)
            self.residents.pop(relay.batch.key, None)
            return SlotOutput(relay.batch.key, relay.batch.method.num_steps, result=result)
        with self.busy():
            resident = self._finish_step(relay)
            state = resident.state
            losses = torch.stack(resident.losses, 1) if resident.losses else torch.empty(len(state.x), 0)
            output = SlotOutput(relay.batch.key, state.step, Chunk(state.checkpoint(), resident.first, losses))
            resident.first, resident.losses = state.step, []
        return output

    def _load(self, plan: SlotPlan) -> Resident:
        key = plan.batch.key
        if plan.checkpoint is not None or plan.start:
            state = self.start_state(plan.batch, plan.checkpoint)
            self.residents[key] = Resident(state, state.step)
        if key not in self.residents:
            raise LostStepError(f"micro-batch {key}: the prior holds no state for it (worker restarted?)")
        resident = self.residents[key]
        resident.until, resident.batch = plan.until, plan.batch
        return resident

    def _finish_step(self, relay: Relay) -> Resident:
        """Resume the paused step with the sampler's answer (an unguided step was finished by _begin_step)."""
        if relay.batch.key not in self.residents:
            raise LostStepError(f"micro-batch {relay.batch.key}: the prior holds no state for it (worker restarted?)")
        resident = self.residents[relay.batch.key]
        if relay.answer is not None:
            resident.state = finish_step(resident.paused, relay.answer)
            resident.paused = None
            resident.losses.append(resident.state.loss.cpu())
        return resident

    def _begin_step(self, resident: Resident) -> Relay:
        """The next step run up to its gradient request for the sampler, or to its end when unguided (or nothing
        past `until`)."""
        state, batch = resident.state, resident.batch
        if state.step >= resident.until:
            return Relay(batch, state.step)
        step = guided_step(self.prior_side(batch), state)
        begun = begin_step(step)
        if isinstance(begun, ChainState):  # unguided: the whole step is done
            resident.state = begun
            resident.losses.append(begun.loss.cpu())
            return Relay(batch, begun.step)
        resident.paused = step
        x0 = begun.x0 if self.device_messages else begun.x0.cpu()
        return Relay(batch, begun.step, request=GradRequest(begun.step, x0, begun.radius))
