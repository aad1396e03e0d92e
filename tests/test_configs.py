"""Every config composes, and every ``_target_`` points at something importable."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import get_object
from omegaconf import OmegaConf

from sam4mllm import CONFIG_DIR

PRIMARY = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
GROUP_OPTIONS = sorted(
    (g.name, p.stem) for g in CONFIG_DIR.iterdir() if g.is_dir() for p in g.glob("*.yaml")
)


def _targets(node):
    if isinstance(node, dict):
        if "_target_" in node:
            yield node["_target_"]
        for v in node.values():
            yield from _targets(v)
    elif isinstance(node, list):
        for v in node:
            yield from _targets(v)


# exp/ is appended on the command line (+exp=ppg), never listed in a defaults list.
APPENDED = {"exp": ["train", "gen_labels"]}


def _uses(primary: str) -> set[str]:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return {g for g in compose(config_name=primary, return_hydra_config=True).hydra.runtime.choices
                if g in {x for x, _ in GROUP_OPTIONS}}


# Primaries built on another's tree with keys of their own that a user must give: their group
# options are the other's cases; they compose once below.
EXTENDS = {"predict": ("eval", ["image=photo.jpg", "text='the dog on the left'"])}
CASES = [(p, g, o) for p in PRIMARY if p not in EXTENDS
         for g, o in GROUP_OPTIONS if g in _uses(p) or p in APPENDED.get(g, [])]


@pytest.mark.parametrize(("primary", "group", "option"), CASES)
def test_every_config_composes_and_resolves(primary, group, option):
    plus = "+" if group in APPENDED else ""
    extra = [] if group == "exp" or primary not in APPENDED["exp"] else ["+exp=pqpp"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name=primary, overrides=[f"{plus}{group}={option}", *extra])
    container = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    for target in _targets(container):
        get_object(target)


@pytest.mark.parametrize("primary", sorted(EXTENDS))
def test_a_config_built_on_another_composes_with_its_own_keys(primary):
    base, required = EXTENDS[primary]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = OmegaConf.to_container(compose(config_name=primary, overrides=required), resolve=True)
        other = OmegaConf.to_container(compose(config_name=base), resolve=True)
    assert {k: v for k, v in cfg.items() if k in other and k != "out_dir"} == {
        k: v for k, v in other.items() if k != "out_dir"}
    assert cfg["out_dir"].endswith("/photo")  # named after the image


def test_every_group_option_is_composed_somewhere():
    assert {(g, o) for _, g, o in CASES} == set(GROUP_OPTIONS)


def test_dataset_configs_declare_their_splits():
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        for _, name in (o for o in GROUP_OPTIONS if o[0] == "dataset"):
            d = compose(config_name="prepare_data", overrides=[f"dataset={name}"]).dataset
            assert d.split in d.splits and d.task in {"res", "gres", "reasonseg", "vqa"}
            assert d.loader.dataset == d.name == name
            if d.official_counts:
                assert set(d.official_counts) == set(d.splits)


def test_build_keeps_missing_files_readable_and_config_mistakes_located(tmp_path):
    """Hydra would fold the missing-dataset message (layout, fix) into a one-line repr."""
    from hydra.errors import InstantiationException

    from sam4mllm.config import build
    from sam4mllm.data import DatasetNotFoundError

    node = OmegaConf.create({"loader": {"_target_": "sam4mllm.data.refer.ReferDataset", "root": str(tmp_path),
                                        "name": "refcocog", "split": "val", "image_dir": str(tmp_path),
                                        "refs_file": "refs(umd).p"}})
    with pytest.raises(DatasetNotFoundError) as err:
        build(node.loader)
    assert "\n  refer_seg/\n" in str(err.value)
    with pytest.raises(InstantiationException, match="full_key: loader"):  # a TypeError keeps Hydra's pointer
        build(node.loader, bogus=1)


def test_every_eval_preset_is_a_points_round_the_predictor_accepts():
    """A misspelt key under eval.pqpp composes fine in Hydra; the predictor's settings would refuse it."""
    import numpy as np

    from sam4mllm.evaluate import pqpp_config
    from sam4mllm.inference import sample_points

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        for _, name in (o for o in GROUP_OPTIONS if o[0] == "eval"):
            pqpp = pqpp_config(compose(config_name="eval", overrides=[f"eval={name}"]))
            pts = sample_points(np.array([0, 0, 99, 99]), (100, 100), pqpp, np.random.default_rng(0))
            assert len(pts) == (pqpp.grid**2 if pqpp.sampling == "grid" else pqpp.n_random), name


def test_an_evaluation_loads_the_run_its_variant_was_trained_as():
    """box-only is a PQPP model's round 1: no run is trained as box_only, so it reads the PQPP run."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        for variant, run in (("pqpp", "pqpp"), ("ppg", "ppg"), ("box_only", "pqpp")):
            cfg = compose(config_name="eval", overrides=[f"variant={variant}", "paths.output_dir=/out"])
            assert cfg.checkpoint == f"/out/runs/{run}-{cfg.model.family}/final"
            assert cfg.out_dir.startswith(f"/out/eval/{variant}-")  # its results stay its own
        train = compose(config_name="train", overrides=["+exp=pqpp", "paths.output_dir=/out"])
        assert train.run_dir == f"/out/runs/pqpp-{train.model.family}"  # where that checkpoint comes from


def test_an_evaluation_of_other_weights_than_the_default_runs_final_ones_gets_a_folder_of_its_own():
    """An exported step, another run (another seed) or the untrained backbone does not meet the
    default run's final predictions, nor each other's."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        def out_dir(*overrides: str) -> str:
            return compose(config_name="eval", overrides=["paths.output_dir=/out", "eval=table6a", *overrides]).out_dir

        base = out_dir()
        assert base == "/out/eval/pqpp-qwen2vl/synthetic-val/table6a"
        assert out_dir("checkpoint=/out/runs/pqpp-qwen2vl/final") == base
        assert out_dir("checkpoint=/out/runs/pqpp-qwen2vl/../pqpp-qwen2vl/final") == base
        assert out_dir("checkpoint=null") == base + "@untrained"
        assert out_dir("checkpoint=/out/runs/pqpp-qwen2vl/exported/step-0000002") == base + "@step-0000002"
        assert out_dir("checkpoint=/out/runs/pqpp-seed1/final") == base + "@pqpp-seed1"
        assert out_dir("checkpoint=/elsewhere/pqpp-qwen2vl/final") == base + "@pqpp-qwen2vl"
        assert out_dir("checkpoint=/out/runs/pqpp-seed1/exported/step-0000002") == base + "@pqpp-seed1.step-0000002"
        assert out_dir("checkpoint=/out/merged") == base + "@merged"
        assert out_dir("checkpoint=/out/runs/pqpp-qwen2vl/best") == base + "@best"
        assert out_dir("checkpoint=/out/runs/pqpp-seed1/best") == base + "@pqpp-seed1.best"
        # box-only reads the PQPP run: its final is box-only's default too
        assert out_dir("variant=box_only") == "/out/eval/box_only-qwen2vl/synthetic-val/table6a"
        assert out_dir("+exp=ppg", "checkpoint=/out/runs/pqpp-qwen2vl/final").endswith("/table6a@pqpp-qwen2vl")
        predict = compose(config_name="predict", overrides=["paths.output_dir=/out", "image=/a/dog.jpg", "text=x",
                                                            "checkpoint=/out/runs/pqpp-seed1/final"])
        assert predict.out_dir == "/out/predict/pqpp-qwen2vl@pqpp-seed1/dog"
