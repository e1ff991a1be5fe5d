"""The CLI a user reads: every option explains itself and shows its default; rare knobs sit apart."""

from __future__ import annotations

import argparse

import pytest

from item_embed.cli import build_parser


def _commands(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out[prefix + name] = sub
                out.update(_commands(sub, prefix + name + " "))
    return out


COMMANDS = _commands(build_parser())


def test_every_verb_is_there():
    assert {"demo", "synth", "train", "train-dual", "prepare", "fit-shape", "embed", "evaluate", "report", "index",
            "index-update", "search", "dedup", "classify fit", "classify predict", "serve"} <= set(COMMANDS)


@pytest.mark.parametrize("name", sorted(n for n, p in COMMANDS.items() if not any(
    isinstance(a, argparse._SubParsersAction) for a in p._actions)))
def test_every_option_has_help_and_shows_its_default(name):
    parser = COMMANDS[name]
    text = " ".join(parser.format_help().split())
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        label = action.option_strings[0] if action.option_strings else action.dest
        assert action.help and action.help.strip(), f"{name} {label}: no help text"
        default = action.default
        if action.option_strings and default is not None and default is not False:
            assert "default" in action.help or f"(default: {default})" in text, f"{name} {label}: default not shown"


def test_rare_training_knobs_sit_in_an_advanced_group():
    groups = {g.title: {a.dest for a in g._group_actions} for g in COMMANDS["train"]._action_groups}
    assert {"mlm_prob", "mim_ratio", "itm_negatives", "new_lr_scale", "patch_size", "loss_weights"} <= groups["advanced"]
    main = groups.get("options", set()) | groups.get("optional arguments", set())
    assert {"out", "steps", "epochs", "batch_size", "lr", "precision", "resume"} <= main


def test_precision_means_the_same_in_every_verb():
    with_precision = [n for n, p in COMMANDS.items() if any(a.dest == "precision" for a in p._actions)]
    assert {"train", "train-dual", "embed", "evaluate", "search", "serve", "classify fit",
            "classify predict"} <= set(with_precision)
    for name in with_precision:
        action = next(a for a in COMMANDS[name]._actions if a.dest == "precision")
        assert action.default == "auto" and tuple(action.choices) == ("auto", "bf16", "fp32"), name


@pytest.mark.parametrize("flag", ["--pooling", "--mim-target", "--itm-first", "--title-dropout", "--compile",
                                  "--contrastive-views", "--image-contrastive-proj"])
def test_retired_options_are_gone(flag):
    assert flag not in COMMANDS["train"].format_help()
