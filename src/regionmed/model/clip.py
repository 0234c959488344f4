"""RegionMedCLIP: the two towers, projections, the ROI processor and the folder format
(``save_pretrained`` / ``from_pretrained``; ``model.init_from``: a model that starts from a folder)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_model
from torch import nn

from regionmed import __version__
from regionmed.config import ConfigError, from_dict, to_dict
from regionmed.data.loader import ImageBatch
from regionmed.data.transforms import PREPROCESS_FILE, ImageFeatures, Preprocessor
from regionmed.finite import require_finite
from regionmed.io import read_json, write_json_atomic
from regionmed.model.config import ModelConfig, ProjectionConfig, validate_model_config
from regionmed.model.dense import DenseHead
from regionmed.model.roi import ROIProcessor, align_roi_features, scatter_rois
from regionmed.model.towers import ImageTower, TextTower
from regionmed.model.weights import WeightsError, is_global_key, load_global_path, load_weights

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PREPROCESS_NAME = PREPROCESS_FILE  # "preprocess.json"
TEXT_DIR = "text"


@dataclass
class ImageEmbeddings:
    """L2-normalised image-side embeddings.

    ``global_``: whole image (B, D); ``fused``: after the ROI processor (== global_
    when ROIs are off or absent); ``roi``: (B, K, D) or None; ``roi_mask``: (B, K);
    ``cells``: (B, h, w, D), each cell of the feature grid projected into the joint space
    (what :meth:`RegionMedCLIP.patch_embeddings` gives), only when asked for."""

    global_: torch.Tensor
    fused: torch.Tensor
    roi: torch.Tensor | None = None
    roi_mask: torch.Tensor | None = None
    cells: torch.Tensor | None = None


def plan_text_chunks(
    lengths: Sequence[int], pad_slack: float = 0.25, max_rows: int = 64, max_tokens: int | None = None
) -> list[list[int]]:
    """Group texts of token counts ``lengths`` into chunks that are encoded (and padded) together.

    Returns lists of indices into ``lengths``; every index appears exactly once. Texts
    are taken shortest first (a stable sort); each chunk is padded to its longest
    member, so it costs ``rows x longest`` padded tokens for ``sum(lengths)`` real ones.
    The next text opens a new chunk when adding it would make

    * the chunk's padded tokens exceed ``(1 + pad_slack)`` x its real tokens, or
    * the chunk hold more than ``max_rows`` texts, or
    * the chunk's padded tokens exceed ``max_tokens`` (when given; a text longer than
      that is a chunk of its own).

    Guarantee: in every chunk, and so over the whole plan, padded tokens
    <= ``(1 + pad_slack)`` x real tokens (no additive term). Cost: the padding rule
    alone opens at most ``1 + log(longest / shortest) / log(1 + pad_slack)`` chunks (each
    new chunk starts more than ``1 + pad_slack`` times longer than the previous one
    started); ``max_rows`` and ``max_tokens`` add the splits they ask for.
    """
    if pad_slack < 0:
        raise ValueError(f"pad_slack must be >= 0, got {pad_slack}")
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    chunks: list[list[int]] = []
    current: list[int] = []
    real = 0
    for i in order:
        n = int(lengths[i])
        rows, padded = len(current) + 1, (len(current) + 1) * n  # sorted: the new text is the longest
        fits = (
            current
            and rows <= max_rows
            and padded <= (1 + pad_slack) * (real + n)
            and (max_tokens is None or padded <= max_tokens)
        )
        if current and not fits:
            chunks.append(current)
            current, real = [], 0
        current.append(i)
        real += n
    if current:
        chunks.append(current)
    return chunks


class MlpProjection(nn.Module):
    """``fc2(GELU(fc1(x)))``: ``Linear(width, hidden) -> GELU (exact, erf) -> Linear(hidden, out)``.

    Works on any leading shape ``(..., width) -> (..., out)``. The form of open_clip's MLP
    heads (TimmModel ``mlp``: timm ``Mlp``; HFTextEncoder ``mlp``), without their dropout."""

    def __init__(self, width: int, hidden: int, out: int, hidden_bias: bool, bias: bool):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden, bias=hidden_bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def build_projection(pc: ProjectionConfig, width: int, embed_dim: int, where: str) -> nn.Module:
    """The projection of a tower's pooled feature ``(..., width)`` to ``(..., embed_dim)`` that
    ``pc`` describes (see :class:`~regionmed.model.config.ProjectionConfig`). A linear one keeps
    the state-dict names of earlier versions (``projections.image.weight``). Raises
    :class:`ConfigError` naming ``where`` for ``none`` with ``width != embed_dim``."""
    if pc.type == "linear":
        return nn.Linear(width, embed_dim, bias=pc.bias)
    if pc.type == "mlp":
        return MlpProjection(width, pc.hidden or 2 * embed_dim, embed_dim, pc.hidden_bias, pc.bias)
    if width != embed_dim:
        raise ConfigError(f"{where}.type is 'none', but the tower's width {width} differs from model.embed_dim {embed_dim}")
    return nn.Identity()


class RegionMedCLIP(nn.Module):
    """CLIP-style model aligning images and their regions with text.

    Module groups (the names stages use for ``trainable``): ``image_tower``,
    ``text_tower``, ``roi_processor``, ``dense_head``, ``projections``, ``logit_scale``.
    """

    def __init__(self, cfg: ModelConfig, text_source: str | None = None):
        super().__init__()
        validate_model_config(cfg)
        self.cfg = cfg
        self.image_tower = ImageTower(cfg.image)
        self.text_tower = TextTower(cfg.text, source=text_source)
        self.projections = nn.ModuleDict(
            {
                "image": build_projection(cfg.image.projection, self.image_tower.width, cfg.embed_dim, "model.image.projection"),
                "text": build_projection(cfg.text.projection, self.text_tower.width, cfg.embed_dim, "model.text.projection"),
            }
        )
        if cfg.roi.mode != "none" and self.image_tower.width % cfg.roi.num_heads:
            raise ConfigError(f"model.roi.num_heads is {cfg.roi.num_heads}: it must divide the image tower's width "
                              f"{self.image_tower.width} ({cfg.image.name!r})")
        multiple = self.image_tower.size_multiple
        if cfg.roi.mode == "crop" and multiple and cfg.roi.roi_size % multiple:
            raise ConfigError(f"model.roi.roi_size is {cfg.roi.roi_size}: ROI crops go through {cfg.image.name!r}, which "
                              f"takes sides that are multiples of its patch size {multiple}")
        self.roi_processor = ROIProcessor(self.image_tower.width, cfg.roi) if cfg.roi.mode != "none" else None
        self.dense_head = DenseHead(self.image_tower.width, cfg.dense) if cfg.dense.head != "none" else None
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.logit_scale_init)))
        # The image/text preprocessing (an immutable Preprocessor): derived from cfg here,
        # replaced by the folder's preprocess.json in from_pretrained.
        self.preprocessor = preprocessor_from_config(cfg)

    # -- module groups -------------------------------------------------------------
    def module_groups(self) -> dict[str, list[nn.Parameter]]:
        groups = {
            "image_tower": list(self.image_tower.parameters()),
            "text_tower": list(self.text_tower.parameters()),
            "roi_processor": list(self.roi_processor.parameters()) if self.roi_processor is not None else [],
            "dense_head": list(self.dense_head.parameters()) if self.dense_head is not None else [],
            "projections": list(self.projections.parameters()),
            "logit_scale": [self.logit_scale],
        }
        return groups

    def set_trainable(self, names: list[str]) -> None:
        """Make exactly the named groups trainable (``["all"]`` = every group)."""
        groups = self.module_groups()
        wanted = set(groups) if "all" in names else set(names)
        unknown = wanted - set(groups)
        if unknown:
            raise ValueError(f"unknown module group(s) {sorted(unknown)} (known: {sorted(groups)})")
        for name, params in groups.items():
            for p in params:
                p.requires_grad_(name in wanted)

    def scale(self) -> torch.Tensor:
        """exp(logit_scale) clamped to ``logit_scale_max``."""
        return self.logit_scale.exp().clamp(max=self.cfg.logit_scale_max)

    # -- encoders --------------------------------------------------------------------
    def image_features(self, images: torch.Tensor | None, features: ImageFeatures | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, S, S) normalised (or the tower's outputs as ``features``) -> the
        tower's pooled feature (B, C) and the feature grid (B, C, h, w) after the grid head
        (:class:`~regionmed.model.dense.DenseHead`, when the model has one): the grid every
        region-level path reads."""
        pooled, grid = (features.pooled, features.grid) if features is not None else self.image_tower(images)
        if self.dense_head is not None:
            grid = self.dense_head(grid)
        return pooled, grid

    def project_cells(self, grid: torch.Tensor) -> torch.Tensor:
        """A feature grid (B, C, h, w) -> each cell projected into the joint space, (B, h, w, D),
        L2-normalised."""
        return F.normalize(self.projections["image"](grid.permute(0, 2, 3, 1)), dim=-1)

    def encode_image(
        self,
        images: torch.Tensor,
        boxes: torch.Tensor | None = None,
        roi_mask: torch.Tensor | None = None,
        roi_crops: torch.Tensor | None = None,
        use_rois: bool = True,
        cells: bool = False,
        features: ImageFeatures | None = None,
    ) -> ImageEmbeddings:
        """images (B, 3, S, S) normalised; boxes (B, K, 4) in [0, 1]; roi_mask (B, K);
        roi_crops (N_valid, 3, r, r) in the order of ``roi_mask.nonzero()`` (crop mode).

        ROI features before the ROI processor, ``(N_valid, C)`` with C the image tower's width:
        crop mode, the crops' pooled features (``image_tower.encode_crops``); with
        ``roi.grid_context`` plus the global pass's feature grid ``(B, C, h, w)`` RoIAlign-pooled
        over each box (``align_roi_features``, ``roi.align_output``), so the token also holds what
        the whole image shows at the box's place (which lung field, next to the heart...); align
        mode, the RoIAlign features alone. The grid is the grid head's output when the model has
        one (:meth:`image_features`). ``cells``: also return the projected grid (``.cells``),
        from the same pass (the ``grounding`` loss term reads it). ``features``: the image tower's
        outputs (:class:`ImageFeatures`, e.g. a locked tower's cache) instead of ``images`` and
        ``roi_crops``; the rest of the model runs as from pixels."""
        pooled, grid = self.image_features(images, features)
        proj = self.projections["image"]
        global_ = F.normalize(proj(pooled), dim=-1)
        cell_emb = self.project_cells(grid) if cells else None
        if not use_rois or self.roi_processor is None or boxes is None or roi_mask is None:
            return ImageEmbeddings(global_, global_, cells=cell_emb)
        roi_mask = roi_mask.bool()
        if self.cfg.roi.mode == "crop":
            if features is not None:
                if features.crops is None or features.crops.shape[0] != int(roi_mask.sum()):
                    have = None if features.crops is None else features.crops.shape[0]
                    raise ValueError(f"features.crops has {have} crop features for {int(roi_mask.sum())} valid boxes")
                valid = features.crops
            elif roi_crops is None:
                raise ValueError("ROI mode 'crop' needs roi_crops (see regionmed.data.transforms.Preprocessor)")
            elif roi_crops.shape[0] != int(roi_mask.sum()):
                raise ValueError(f"roi_crops has {roi_crops.shape[0]} crops for {int(roi_mask.sum())} valid boxes")
            else:
                valid = self.image_tower.encode_crops(roi_crops)
            if self.cfg.roi.grid_context:
                valid = valid + align_roi_features(grid, boxes, roi_mask, self.cfg.roi.align_output).to(valid.dtype)
        else:
            valid = align_roi_features(grid, boxes, roi_mask, self.cfg.roi.align_output)
        roi_feats = scatter_rois(valid, roi_mask)
        fused, rois = self.roi_processor(pooled, grid, roi_feats, boxes, roi_mask)
        fused_emb = F.normalize(proj(fused), dim=-1)
        roi_emb = F.normalize(proj(rois), dim=-1) * roi_mask.unsqueeze(-1)
        return ImageEmbeddings(global_, fused_emb, roi_emb, roi_mask, cell_emb)

    def encode_batch(self, batch: ImageBatch, use_rois: bool = True, check_finite: bool = True,
                     cells: bool = False) -> ImageEmbeddings:
        """:meth:`encode_image` on a collated :class:`~regionmed.data.loader.ImageBatch` (a training
        :class:`~regionmed.data.loader.Batch` is one), moved to the model's device: the one image
        encoder of training-time validation, evaluation and inference. Crops are passed in crop
        mode only; ``use_rois=False`` (or a model without an ROI path) gives the whole image.
        A batch of cached tower outputs (``batch.features``, a locked image tower) is encoded
        from them; ``cells`` also returns the projected grid (the ``grounding`` term).
        With ``check_finite`` (evaluation, inference) raises
        :class:`~regionmed.finite.NonFiniteEmbeddingError` when an embedding holds NaN or inf
        (damaged or diverged weights); training leaves that to its loss (a non-finite step is skipped)."""
        device = self.logit_scale.device
        images = None if batch.images is None else batch.images.to(device)
        features = None if batch.features is None else batch.features.to(device)
        if not use_rois:
            emb = self.encode_image(images, use_rois=False, cells=cells, features=features)
        else:
            crops = batch.roi_crops.to(device) if (batch.roi_crops is not None and self.cfg.roi.mode == "crop") else None
            emb = self.encode_image(images, batch.boxes.to(device), batch.roi_mask.to(device), crops, use_rois=True,
                                    cells=cells, features=features)
        return require_finite(emb) if check_finite else emb

    def patch_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Each cell of the feature grid (after the grid head, when there is one) projected
        into the joint space: (B, h, w, D), L2-normalised (for patch–text similarity maps,
        grounding)."""
        return self.project_cells(self.image_features(images)[1])

    def encode_text(
        self, texts: list[str], batch_size: int | None = None, pad_slack: float = 0.25, max_tokens: int | None = None
    ) -> torch.Tensor:
        """L2-normalised text embeddings (N, D), one row per text of ``texts``:
        :meth:`project_text` of :meth:`text_features`."""
        if not texts:
            return self.logit_scale.new_zeros(0, self.cfg.embed_dim)
        return self.project_text(self.text_features(texts, batch_size, pad_slack, max_tokens))

    def text_features(
        self, texts: list[str], batch_size: int | None = None, pad_slack: float = 0.25, max_tokens: int | None = None
    ) -> torch.Tensor:
        """The text tower's pooled features (N, W), one row per text of ``texts`` (before the projection).

        Identical texts are encoded once. The unique texts are sorted by token length
        and encoded in chunks planned by :func:`plan_text_chunks`: at most
        ``batch_size`` texts (default 64) and, when given, ``max_tokens`` padded tokens
        per chunk, and padding bounded — in every chunk, hence in the whole call,
        padded tokens <= ``(1 + pad_slack)`` x real tokens (default 1.25 x), so a
        short caption is never padded to the length of a report. Padding is masked, so
        the features do not depend on the chunking (beyond float rounding)."""
        unique = list(dict.fromkeys(texts))
        device = self.logit_scale.device
        if not unique:
            return self.logit_scale.new_zeros(0, self.text_tower.width)
        tokenizer = self.text_tower.tokenizer
        ids = tokenizer.ids(unique)
        plan = plan_text_chunks([len(x) for x in ids], pad_slack, batch_size or 64, max_tokens)
        chunks, placed = [], []
        for part in plan:
            input_ids, mask = tokenizer.pad([ids[i] for i in part])
            chunks.append(self.text_tower(input_ids.to(device), mask.to(device)))
            placed += part
        feats = torch.cat(chunks)
        row_of = {u: r for r, u in enumerate(placed)}
        position = {t: row_of[i] for i, t in enumerate(unique)}
        return feats[torch.tensor([position[t] for t in texts], device=feats.device)]

    def project_text(self, features: torch.Tensor) -> torch.Tensor:
        """The text tower's pooled features (N, W) -> L2-normalised text embeddings (N, D) (what
        :meth:`encode_text` does after the tower; a locked tower's cached features go here)."""
        return F.normalize(self.projections["text"](features), dim=-1)

    # -- folder format ---------------------------------------------------------------
    def preprocess_config(self) -> dict:
        """``preprocess.json`` as a mapping: the JSON form of :attr:`preprocessor`."""
        return self.preprocessor.to_dict()

    def save_pretrained(self, directory: str | Path, extra_files: Mapping[str, str | bytes] | None = None) -> Path:
        """Write ``config.json``, ``model.safetensors``, ``preprocess.json`` and the text
        tower's config + tokenizer (``text/``) into ``directory``. No pickle.

        The folder is written as a whole (:func:`regionmed.outputs.replace_folder`: beside
        it, then swapped in atomically, under its writer lock), so a process stopped at any
        point leaves the previous model or the new one. ``directory``: new, empty, or a
        regionmed model folder (``config.json``); another non-empty folder is refused
        (:class:`~regionmed.outputs.OutputError`). ``extra_files``: further files of the
        folder (name -> text or bytes), written in the same step."""
        from regionmed.outputs import replace_folder

        check_preprocessor(self.preprocessor, self.cfg, "the model's preprocessor", "its config")  # never write a folder that cannot load
        directory = Path(directory)
        with replace_folder(directory, owned=lambda d: (d / CONFIG_NAME).is_file(), what="regionmed model folder") as tmp:
            self._write_folder(tmp)
            for name, data in (extra_files or {}).items():
                target = tmp / name
                target.write_bytes(data) if isinstance(data, bytes) else target.write_text(data, encoding="utf-8")
        return directory

    def _write_folder(self, directory: Path) -> None:
        # The weights are in the folder: where they first came from is not part of it.
        cfg = dataclasses.replace(self.cfg, image=dataclasses.replace(self.cfg.image, pretrained=None), init_from=None)
        write_json_atomic(directory / CONFIG_NAME, {"regionmed_version": __version__, "model": to_dict(cfg)}, sort_keys=False)
        write_json_atomic(directory / PREPROCESS_NAME, self.preprocess_config(), sort_keys=False)
        self.text_tower.model.config.save_pretrained(directory / TEXT_DIR)
        self.text_tower.hf_tokenizer.save_pretrained(directory / TEXT_DIR)
        save_model(self, str(directory / WEIGHTS_NAME), metadata={"format": "pt", "regionmed_version": __version__})

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> "RegionMedCLIP":
        """Load a folder written by :meth:`save_pretrained`, offline.

        The model carries the preprocessing read from the folder's ``preprocess.json``
        (``model.preprocessor``). That file must exist, hold every field with its type,
        and agree with ``config.json``; otherwise :class:`WeightsError` names the file
        and the field (no fallback to defaults or to the config).

        Every way a folder can be damaged or mismatched raises :class:`WeightsError`
        naming the file: a missing folder, ``config.json``, ``text/`` or
        ``model.safetensors``; a ``config.json`` that is not JSON, lacks its ``model``
        mapping or holds a bad field; a truncated or unreadable ``model.safetensors``;
        weights that do not fit the config (missing or unexpected tensors, other shapes);
        non-finite weights."""
        from regionmed.outputs import read_folder

        return read_folder(directory, lambda: cls._from_folder(Path(directory), map_location))

    @classmethod
    def _from_folder(cls, directory: Path, map_location) -> "RegionMedCLIP":
        cfg = read_model_config(directory)
        config_path = directory / CONFIG_NAME
        try:
            pre = Preprocessor.from_folder(directory)
        except ConfigError as err:
            raise WeightsError(f"cannot load {directory}: {err}") from err
        check_preprocessor(pre, cfg, str(directory / PREPROCESS_NAME), str(config_path))
        text_dir = directory / TEXT_DIR
        if not text_dir.is_dir():
            raise WeightsError(f"{text_dir} is missing: the text tower's config and tokenizer are not in {directory}")
        weights = directory / WEIGHTS_NAME
        if not weights.is_file():
            raise WeightsError(f"{weights} is missing: {directory} holds no weights")
        try:
            model = cls(cfg, text_source=str(text_dir))
        except ConfigError as err:
            raise WeightsError(f"cannot load {directory}: {config_path}: {err}") from err
        model.preprocessor = pre
        load_weights(model, weights, device=str(map_location))
        return model.to(map_location).eval()


def read_model_config(folder: str | Path, where: str = "") -> ModelConfig:
    """The validated :class:`ModelConfig` of the regionmed model folder ``folder`` (its
    ``config.json``). Raises :class:`WeightsError` naming the folder or file when the folder
    or ``config.json`` is missing, not JSON, lacks its ``model`` mapping or holds a bad field.
    ``where`` (e.g. ``"model.init_from"``) starts every message."""
    folder = Path(folder)
    lead = f"{where}: " if where else ""
    if not folder.is_dir():
        raise WeightsError(f"{lead}model folder {folder} does not exist (or is not a folder)")
    config_path = folder / CONFIG_NAME
    data = read_json(config_path, WeightsError, f"{lead}the model config")
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise WeightsError(f"{lead}{config_path}: no 'model' mapping (the model config): not a regionmed model folder")
    try:
        cfg = from_dict(ModelConfig, data["model"], "model", str(config_path))
        validate_model_config(cfg, str(config_path))
    except ConfigError as err:
        raise WeightsError(f"{lead}cannot load {folder}: {err}") from err
    return cfg


def read_model_folder(folder: str | Path, where: str = "") -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """``(config, state dict)`` of the regionmed model folder ``folder``: its ``config.json``
    (:func:`read_model_config`) and the tensors of its ``model.safetensors`` (CPU, by
    regionmed name). Raises :class:`WeightsError` naming the file when either is missing,
    damaged or truncated. ``where`` starts every message."""
    folder = Path(folder)
    cfg = read_model_config(folder, where)
    weights = folder / WEIGHTS_NAME
    lead = f"{where}: " if where else ""
    if not weights.is_file():
        raise WeightsError(f"{lead}{weights} is missing: {folder} holds no weights")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise WeightsError(f"{lead}{weights} cannot be read (truncated or not safetensors): {err}") from err
    return cfg, state


def preprocessor_from_config(cfg: ModelConfig) -> Preprocessor:
    """The preprocessing a :class:`ModelConfig` implies (image size and normalisation,
    ROI mode, crop size and margin, ROI count, text context length)."""
    return Preprocessor(
        image_size=cfg.image.image_size,
        mean=tuple(cfg.image.mean),
        std=tuple(cfg.image.std),
        roi_mode=cfg.roi.mode,
        roi_size=cfg.roi.roi_size,
        context_margin=cfg.roi.context_margin,
        max_rois=cfg.roi.max_rois,
        context_length=cfg.text.context_length,
    )


def check_preprocessor(pre: Preprocessor, cfg: ModelConfig, source: str, config_source: str) -> None:
    """Raise :class:`WeightsError` naming ``source`` and the first field where ``pre``
    disagrees with what ``cfg`` implies."""
    expected = preprocessor_from_config(cfg)
    for f in dataclasses.fields(Preprocessor):
        have, want = getattr(pre, f.name), getattr(expected, f.name)
        if have != want:
            raise WeightsError(
                f"{source}: field {f.name!r} is {have!r} but {config_source} implies {want!r}; "
                "the preprocessing settings and the model config must agree"
            )


def load(directory: str | Path, map_location: str | torch.device = "cpu") -> RegionMedCLIP:
    """``regionmed.load(dir)``: a model saved with ``save_pretrained``, in eval mode."""
    return RegionMedCLIP.from_pretrained(directory, map_location)


def create_model(cfg: ModelConfig) -> RegionMedCLIP:
    """Build a model from a :class:`ModelConfig` (pretrained weights from local paths in it).

    With ``cfg.init_from`` (a regionmed model folder, e.g. one written by ``regionmed
    import-open-clip``) the towers, projections and temperature start from that folder's
    weights; see :func:`init_from_folder` for the checks and errors."""
    if cfg.init_from:
        return init_from_folder(cfg)
    return RegionMedCLIP(cfg)


# -- model.init_from: a model that starts from a regionmed folder ----------------------------
# Fields that may differ between a run's model config and its init_from folder.
_FREE_FIELDS = {"image.pretrained", "image.grad_checkpointing", "image.crop_batchnorm", "text.name", "text.pretrained",
                "text.grad_checkpointing", "text.config_overrides", "logit_scale_init", "logit_scale_max", "init_from"}


def _flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key not in ("kwargs", "config_overrides"):
            out.update(_flat(value, name + "."))
        else:
            out[name] = value
    return out


def init_from_folder(cfg: ModelConfig) -> RegionMedCLIP:
    """Build the model of ``cfg`` with the weights of the regionmed folder ``cfg.init_from``.

    The towers, projections and temperature come from the folder (its ``text/`` gives the
    text tower's config and tokenizer), the ROI processor (grid head) too when the folder's
    ``roi`` (``dense``) settings equal ``cfg.roi`` (``cfg.dense``), otherwise it starts new. Every tower/projection/preprocessing
    field of ``cfg`` (all but ``pretrained``, ``grad_checkpointing``, ``crop_batchnorm``,
    ``text.name``, ``text.config_overrides``, ``logit_scale_*``) must equal the folder's:
    otherwise :class:`~regionmed.config.ConfigError` names the first differing field with
    both values. A damaged or missing folder raises :class:`WeightsError`."""
    folder = Path(cfg.init_from)
    config_path = folder / CONFIG_NAME
    theirs, state = read_model_folder(folder, "model.init_from")
    if cfg.image.pretrained:
        raise ConfigError("model.image.pretrained and model.init_from are both set: the image tower would start from two "
                          "weights files; keep one")
    mine_flat, their_flat = _flat(to_dict(cfg)), _flat(to_dict(theirs))
    for key in sorted(set(mine_flat) | set(their_flat)):
        if key.startswith(("roi.", "dense.")) or key in _FREE_FIELDS:
            continue
        if mine_flat.get(key) != their_flat.get(key):
            raise ConfigError(f"model.{key} is {mine_flat.get(key)!r} but model.init_from's {config_path} has "
                              f"{their_flat.get(key)!r}: the model must have the architecture of the folder it starts from "
                              f"(copy its settings, e.g. from {folder / 'model.yaml'} when it was imported)")
    text_dir = folder / TEXT_DIR
    if not text_dir.is_dir():
        raise WeightsError(f"model.init_from: {text_dir} is missing (the text tower's config and tokenizer)")
    model = RegionMedCLIP(cfg, text_source=str(text_dir))
    weights = folder / WEIGHTS_NAME
    with_roi = dataclasses.asdict(theirs.roi) == dataclasses.asdict(cfg.roi) and cfg.roi.mode != "none"
    with_dense = dataclasses.asdict(theirs.dense) == dataclasses.asdict(cfg.dense) and cfg.dense.head != "none"
    parts = tuple(p for p, kept in (("roi_processor.", with_roi), ("dense_head.", with_dense)) if kept)
    state = {k: v for k, v in state.items() if is_global_key(k) or k.startswith(parts)}
    load_global_path(model, state, f"model.init_from: {weights}", with_parts=parts)
    log.info("model.init_from %s: towers, projections and temperature loaded; ROI processor %s; grid head %s", folder,
             "loaded" if with_roi else "new", "loaded" if with_dense else ("new" if cfg.dense.head != "none" else "none"))
    return model

