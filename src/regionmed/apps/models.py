"""Subcommand ``regionmed models``: the named model architectures (:mod:`regionmed.model.registry`).

``regionmed models`` lists them; ``regionmed models NAME`` shows one: its complete model config
(what ``model: {name: NAME}`` in a run config stands for) and the preprocessing it implies.
"""

from __future__ import annotations

import argparse
import json

import yaml

from regionmed.model.clip import preprocessor_from_config
from regionmed.model.registry import get_model, list_models

HELP = "list the named model architectures (model.name in a run config), or show one"

DESCRIPTION = """\
Named model architectures: a run config's `model: {name: NAME}` is NAME's complete model
config, and fields given beside `name` are laid over it, e.g.

  model:
    name: resnet18-minilm
    roi: {mode: none}

(`--set model.name=NAME` works the same). Each carries its preprocessing (image size and
normalisation, ROI crops, text context length). Your own: regionmed.model.registry.register(
"my-model", config, description) before the run config is read.
"""


def _summary(name: str) -> str:
    m = get_model(name).config
    image, text, roi = m["image"], m["text"], m["roi"]
    weights = f", {image['pretrained']}" if image["pretrained"] else ", random init"
    stride = f", stride {image['output_stride']}" if image["output_stride"] else ""
    text_init = "pretrained" if text["pretrained"] else "random init"
    rois = "no ROI path" if roi["mode"] == "none" else f"{roi['mode']} ROIs x{roi['max_rois']}"
    return (f"{image['name']} @{image['image_size']} px{stride}{weights}; {text['name']} ({text_init}, {text['context_length']} "
            f"tokens); embed {m['embed_dim']}; {rois}")


def _models(args: argparse.Namespace) -> int:
    if not args.name:
        width = max(len(n) for n in list_models())
        for name in list_models():
            print(f"{name:<{width}}  {_summary(name)}")
            print(f"{'':<{width}}  {get_model(name).description}")
        return 0
    named = get_model(args.name)
    cfg = named.model_config()
    shown = {"name": named.name, "description": named.description, "source": named.source, "model": named.config,
             "preprocess": preprocessor_from_config(cfg).to_dict()}
    if args.json:
        print(json.dumps(shown, indent=2))
    else:
        print(yaml.safe_dump(shown, sort_keys=False, width=110, default_flow_style=None), end="")
    return 0


def _arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("name", nargs="?", help="a model name: show its config and preprocessing")
    p.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    p.set_defaults(func=_models)
    return p


def main(argv: list[str]) -> int:
    """``regionmed models ARGV`` (unknown names are a :class:`~regionmed.config.ConfigError`)."""
    parser = _arguments(argparse.ArgumentParser(prog="regionmed models", description=DESCRIPTION,
                                                formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    return args.func(args)
