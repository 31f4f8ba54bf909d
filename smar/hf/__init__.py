"""Hugging Face integration (imports transformers).

* :class:`SMARTrainer` / :class:`SMARTrainerMixin` (:mod:`smar.hf.trainer`): SMAR's routing loss
  in a ``transformers.Trainer`` or TRL ``SFTTrainer``; checkpoints with the original router keys
  plus the trained bias; resume restores bias and optimizer state.
* :func:`save_bias`, :func:`load_bias` (:mod:`smar.hf.saving`): the trained modality bias in
  ``smar_bias.safetensors`` beside the model's own files, and back onto a loaded model.
* :func:`upcycle_hf`, :func:`from_pretrained_upcycled` (:mod:`smar.hf.upcycle`): MoE-LLaVA style
  upcycling of dense decoders, ZeRO-3 partitioned parameters included.
* :func:`inspect_model_dir` (:mod:`smar.hf.inspect`): the routers of a saved model.
* :func:`load_model_folder` (:mod:`smar.hf.loading`): any saved model folder, with its trained
  bias; what every command loads folders with.
"""

from smar.hf.inspect import inspect_model_dir, load_model_dir
from smar.hf.loading import Loaded, load_model_folder
from smar.hf.saving import BIAS_FILE, load_bias, save_bias
from smar.hf.trainer import SMARTrainer, SMARTrainerMixin
from smar.hf.upcycle import from_pretrained_upcycled, upcycle_hf, upcycled_class

__all__ = [
    "BIAS_FILE",
    "SMARTrainerMixin",
    "SMARTrainer",
    "save_bias",
    "load_bias",
    "upcycle_hf",
    "from_pretrained_upcycled",
    "upcycled_class",
    "load_model_dir",
    "inspect_model_dir",
    "load_model_folder",
    "Loaded",
]
