"""``regionmed import-open-clip`` (open_clip / BiomedCLIP checkpoint → regionmed model folder)
and ``regionmed export-open-clip`` (a model folder's global path → open_clip checkpoint)."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from regionmed.outputs import check_output, replace_folder


def _cmd_import(args: argparse.Namespace) -> int:
    import yaml

    from regionmed.config import to_dict
    from regionmed.model.clip import CONFIG_NAME
    from regionmed.model.config import RoiConfig
    from regionmed.model.interop import import_open_clip

    inputs = [("the checkpoint", args.checkpoint), ("the --config file", args.config), ("the --text-dir", args.text_dir)]
    out = check_output(args.out, inputs=inputs, owned=lambda d: (d / CONFIG_NAME).is_file(), what="regionmed model folder")
    roi = RoiConfig(mode=args.roi_mode)
    model = import_open_clip(args.checkpoint, args.config, text_dir=args.text_dir, roi=roi)
    # The model section a run config uses to start training from this folder.
    section = to_dict(model.cfg)
    section["init_from"] = str(out.resolve())
    section["text"]["name"] = str((out / "text").resolve())
    model_yaml = ("# Paste as the `model:` section of a run config to train from this imported checkpoint.\n"
                  + yaml.safe_dump({"model": section}, sort_keys=False))
    model.save_pretrained(out, extra_files={"model.yaml": model_yaml})  # the folder as a whole (regionmed.outputs)
    print(f"wrote {out} (regionmed.load('{out}')); run-config model section: {out / 'model.yaml'}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    from regionmed.model.clip import load
    from regionmed.model.interop import InteropError, export_open_clip_state_dict, open_clip_config

    owned = lambda d: (d / "open_clip_config.json").is_file()  # noqa: E731
    out = check_output(args.out, inputs=[("the model folder", args.model)], owned=owned, what="open_clip export folder")
    model = load(args.model)
    state = export_open_clip_state_dict(model)
    config = open_clip_config(model)
    # The text tower's Hugging Face config and tokenizer files go into OUT itself: open_clip's
    # local-dir loading reads the tokenizer from that folder (get_tokenizer('local-dir:OUT')),
    # and hf_model_name "." is OUT's config.json (open_clip passes it to transformers as it
    # is, so it resolves against the working directory: see the README).
    text_dir = Path(args.model) / "text"
    if not (text_dir / "config.json").is_file():
        raise InteropError(f"{text_dir / 'config.json'} is missing: {args.model} is not a complete model folder")
    copied = 0
    with replace_folder(out, owned=owned, what="open_clip export folder", flag="--out") as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "open_clip_model.safetensors"))
        for f in sorted(text_dir.iterdir()):
            if f.is_file() and f.name != "open_clip_config.json":
                shutil.copyfile(f, tmp / f.name)
                copied += 1
        config["model_cfg"]["text_cfg"].update(hf_model_name=".", hf_tokenizer_name=".")
        (tmp / "open_clip_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    print(f"wrote {out} with the text tower's config and tokenizer ({copied} files): open_clip.create_model("
          f"'local-dir:{out}') from inside it (or with text_cfg hf_model_name={out}), open_clip.get_tokenizer("
          f"'local-dir:{out}') from anywhere; the ROI processor is not part of it")
    return 0


def add_interop_parsers(sub) -> None:
    p = sub.add_parser(
        "import-open-clip", help="open_clip / BiomedCLIP checkpoint → regionmed model folder",
        description="Import an open_clip checkpoint with a timm image tower and a Hugging Face text tower (BiomedCLIP's "
                    "architecture) into a regionmed model folder whose global path gives open_clip's embeddings; the ROI "
                    "processor starts new. Offline: the text tower's config and tokenizer come from --text-dir or from "
                    "text_cfg.hf_model_name as a local folder / Hugging Face cache. Also writes OUT/model.yaml, the "
                    "`model:` section of a run config that trains from the folder (model.init_from).")
    p.add_argument("checkpoint", help="open_clip weights: open_clip_pytorch_model.bin, .pt or .safetensors (no pickle: "
                                      "read with weights_only=True)")
    p.add_argument("--config", required=True, help="open_clip_config.json (or an open_clip model config JSON)")
    p.add_argument("--out", required=True, help="regionmed model folder to write")
    p.add_argument("--text-dir", help="folder with the text tower's Hugging Face config.json and tokenizer files")
    p.add_argument("--roi-mode", choices=["crop", "align", "none"], default="crop",
                   help="ROI path of the new ROI processor (default crop)")
    p.set_defaults(func=_cmd_import)

    p = sub.add_parser(
        "export-open-clip", help="regionmed model folder → open_clip checkpoint (global path)",
        description="Write the towers, projections and temperature of a regionmed model folder as an open_clip "
                    "checkpoint (open_clip_model.safetensors + open_clip_config.json) for open_clip.create_model("
                    "'local-dir:OUT'). Only models of the import's architecture can be exported.")
    p.add_argument("model", help="regionmed model folder")
    p.add_argument("--out", required=True, help="folder to write")
    p.set_defaults(func=_cmd_export)
