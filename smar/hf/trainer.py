"""SMARTrainer: a ``transformers.Trainer`` (or any subclass, e.g. TRL's ``SFTTrainer``) whose loss
adds SMAR's routing loss, whose checkpoints hold the model's original router keys plus the trained
modality bias (``smar_bias.safetensors``), and whose resume restores both.

Shapes legend: B batch, S sequence, T = B * S tokens.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
import transformers
from torch import nn
from transformers.trainer_utils import EvalLoopOutput

from smar.adapters import Adapter
from smar.collective import default_group
from smar.config import check_config
from smar.errors import UsageError
from smar.hf.saving import load_bias_into, original_state_dict, save_bias
from smar.routing import Regularizer, SMARConfig, attach, balancing_loss_in_model

__all__ = ["SMARTrainerMixin", "SMARTrainer"]

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # the class the mixin is mixed into, as the type checker sees it
    _Trainer = transformers.Trainer
else:
    _Trainer = object


# ----------------------------------------------------------------------------------------------
# Trainer


class SMARTrainerMixin(_Trainer):
    """Adds SMAR's routing loss to a ``transformers.Trainer`` subclass's loss and logs its terms.

    The regularizer is attached before the Trainer is built, so the modality bias parameters are
    part of the model and of the optimizer. Logged at each logging step (means since the last
    log, over micro-batches and, with ``SMARConfig(stats="global")``, over ranks; kept on the
    device in between): ``smar/total``, ``smar/band``, ``smar/lb``, ``smar/z``, ``smar/mrd`` and
    ``smar/layerNN/mrd``. Evaluation reports the same terms on the evaluation set
    (``eval_smar/mrd``, ``eval_smar/layerNN/mrd``, ...: means over its batches, as in training,
    and over every rank's share of it) and ``eval_lm_loss`` (the model's own loss) beside
    ``eval_loss`` (which includes the routing loss); both need labels, as ``eval_loss`` does.
    If the model adds its own load-balancing loss (``output_router_logits=True`` with
    ``router_aux_loss_coef > 0``) while ``lb_weight > 0``, a warning says how to keep only one;
    it is checked after the Trainer is built (TRL's ``SFTTrainer`` turns the model's on in its
    ``__init__``).

    Saving: checkpoints and ``save_model()`` hold the model's original router keys (a plain
    ``from_pretrained`` loads them) and the bias in ``smar_bias.safetensors``
    (:mod:`smar.hf.saving`); ``resume_from_checkpoint`` restores the bias and its optimizer
    state. With PEFT (a ``PeftModel``, or TRL's ``peft_config``) the bias trains as well, and
    is saved beside the adapter.

    Args:
        *args: the Trainer's positional arguments.
        smar_config: :class:`smar.SMARConfig` (defaults if None).
        smar_adapter: adapters for router classes smar does not know.
        **kwargs: the Trainer's keyword arguments.
    """

    def __init__(
        self,
        *args: Any,
        smar_config: SMARConfig | None = None,
        smar_adapter: Adapter | Sequence[Adapter] | None = None,
        **kwargs: Any,
    ):
        model = kwargs.get("model", args[0] if args else None)
        if model is None:
            raise UsageError("SMARTrainer needs the model at construction (model=...)")
        config = check_config(smar_config, "SMARTrainer(smar_config=...)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # warned below, once, with the trainer's words
            self.smar: Regularizer = attach(model, config, adapter=smar_adapter)
        # (names, sums, counts) of the terms since the last log, on the device
        self._smar_sums: _Sums | None = None
        # the same over the evaluation loop running now (apart: it may run inside a window)
        self._smar_eval_sums: _Sums | None = None
        super().__init__(*args, **kwargs)
        self.add_callback(_StepBoundary(self.smar))
        # Checked once the Trainer is built: TRL's SFTTrainer sets output_router_logits inside.
        assert self.model is not None  # given above
        double = balancing_loss_in_model(self.model)
        if double and config.lb_weight > 0:
            warnings.warn(f"SMARTrainer: load balancing would count twice: {double}", stacklevel=2)
        # PEFT freezes every parameter but its adapters (TRL wraps the model after the attach).
        for bias in self.smar.bias_parameters():
            bias.requires_grad_(True)

    # -- saving and loading: original router keys + smar_bias.safetensors

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        assert output_dir is not None  # TrainingArguments gives a default
        if state_dict is not None:
            state_dict = original_state_dict(self.smar, state_dict)
        with self.smar.original_routers():
            super()._save(output_dir, state_dict=state_dict)
        if self.args.should_save:
            save_bias(self.smar, output_dir)

    def _load_from_checkpoint(
        self, resume_from_checkpoint: str, model: nn.Module | None = None
    ) -> None:
        with self.smar.original_routers():
            super()._load_from_checkpoint(resume_from_checkpoint, model=model)
            target = self.model if model is None else model
            config = os.path.join(resume_from_checkpoint, "config.json")
            if isinstance(target, transformers.PreTrainedModel) and os.path.isfile(config):
                # save_pretrained writes MoE experts in the checkpoint layout (one tensor per
                # expert) that the Trainer's plain load_state_dict does not convert back;
                # from_pretrained does.
                fresh = type(target).from_pretrained(resume_from_checkpoint, config=target.config)
                target.load_state_dict(fresh.state_dict(), strict=True)
        if self.smar.bias_parameters():
            load_bias_into(self.smar, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        with self.smar.original_routers():
            super()._load_best_model()
        if self.smar.bias_parameters() and self.state.best_model_checkpoint:
            load_bias_into(self.smar, self.state.best_model_checkpoint)

    # -- evaluation: the routing terms and the LM loss beside eval_loss

    def evaluation_loop(self, *args: Any, **kwargs: Any) -> EvalLoopOutput:
        self._smar_eval_sums = None
        output = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        sums, self._smar_eval_sums = self._smar_eval_sums, None
        if sums is not None:  # None without labels: compute_loss never ran
            # Every rank evaluates its own share of the set: the means are over all shares
            # whatever SMARConfig.stats says (with "global" each batch's terms already are).
            group = default_group("global", self.smar.config.group)
            means = self._smar_means(sums, group)
            output.metrics.update({f"{prefix}_{n}": v for n, v in means.items()})
        return output

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        # Only ask for the outputs if the caller does: TRL recomputes them with an extra forward.
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        loss = cast(torch.Tensor, result[0] if return_outputs else result)
        reg = self.smar.loss()
        # The Trainer divides the loss by the accumulation steps unless the model already
        # normalised it by the number of items in the whole accumulated batch; then so do we.
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (
                getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None
            ) or getattr(self, "compute_loss_func", None) is not None
        if scaled and model.training:
            reg = reg / getattr(self, "current_gradient_accumulation_steps", 1)
        if model.training:
            self._smar_sums = _add_terms(self._smar_sums, self.smar.term_tensors())
        else:
            terms = {"lm_loss": loss.detach(), **self.smar.term_tensors()}
            self._smar_eval_sums = _add_terms(self._smar_eval_sums, terms)
        loss = loss + reg
        return (loss, *result[1:]) if return_outputs else loss

    def _smar_flush(self) -> dict[str, float]:
        """Means of the terms accumulated since the last log over micro-batches and, with
        ``stats="global"``, ranks; then the deferred checks of the regularizer."""
        sums, self._smar_sums = self._smar_sums, None
        if sums is None:
            return {}
        return self._smar_means(sums, default_group(self.smar.config.stats, self.smar.config.group))

    def _smar_means(
        self, sums: _Sums, group: torch.distributed.ProcessGroup | None
    ) -> dict[str, float]:
        """Means of accumulated terms over their finite values, summed over ``group`` (None:
        this rank's) in one all-reduce, then the deferred checks of the regularizer."""
        names, total, count = sums
        both = torch.cat([total, count])  # (2n,)
        if group is not None:
            import torch.distributed as dist

            dist.all_reduce(both, group=group)
        values = both.tolist()
        totals, counts = values[: len(names)], values[len(names) :]
        self.smar.check()
        return {
            n: (t / c if c else float("nan")) for n, t, c in zip(names, totals, counts, strict=True)
        }

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self._smar_sums is not None:
            logs.update(self._smar_flush())
        super().log(logs, *args, **kwargs)


# (names, sums, counts): per-term sums of the finite values and their counts, (n,) each
_Sums = tuple[list[str], torch.Tensor, torch.Tensor]


def _add_terms(sums: _Sums | None, terms: dict[str, torch.Tensor]) -> _Sums:
    """``sums`` with this micro-batch's terms added, on the device (no wait)."""
    values = torch.stack([v.float() for v in terms.values()])  # (n,)
    finite = torch.isfinite(values)  # NaN MRD: a modality absent from this batch
    values = torch.where(finite, values, torch.zeros_like(values))
    names = list(terms)
    if sums is None or sums[0] != names:
        return names, values, finite.float()  # first, or other terms than before
    _, total, count = sums
    return names, total + values, count + finite.float()


class _StepBoundary(transformers.TrainerCallback):
    """Tells the regularizer where optimizer steps end (``SMARConfig(accumulate=True)``)."""

    def __init__(self, regularizer: Regularizer):
        self.regularizer = regularizer

    def on_optimizer_step(
        self,
        args: transformers.TrainingArguments,
        state: transformers.TrainerState,
        control: transformers.TrainerControl,
        **kwargs: Any,
    ) -> None:
        self.regularizer.step()


class SMARTrainer(SMARTrainerMixin, transformers.Trainer):
    """``transformers.Trainer`` with SMAR's routing loss; see :class:`SMARTrainerMixin`.

    Args:
        *args: the ``transformers.Trainer``'s positional arguments.
        smar_config: :class:`smar.SMARConfig` (defaults if None).
        smar_adapter: adapters for router classes smar does not know.
        **kwargs: the ``transformers.Trainer``'s keyword arguments (``model``, ``args``,
            ``train_dataset``, ...).

    Example:
        >>> trainer = SMARTrainer(model=model, args=TrainingArguments("out"),   # doctest: +SKIP
        ...                       train_dataset=ds, smar_config=smar.SMARConfig())
    """
