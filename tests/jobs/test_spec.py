"""JobSpec validation: shipped examples load, malformed specs give one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.cli import build_parser, spec_from_args
from pipeline.spec import SpecError, build_spec, load_spec_file
from pipeline.ray_env import actor_options

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "jobs" / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_examples_are_valid(path):
    spec = build_spec(load_spec_file(path), str(path))
    assert spec.output and spec.input


def test_examples_cover_every_accelerator():
    kinds = {build_spec(load_spec_file(p)).resources.accelerator for p in EXAMPLES}
    assert kinds == {"cpu", "gpu", "tpu"}


def test_resource_shapes():
    base = {"input": "in/", "output": "out/"}
    cpu = actor_options(build_spec({**base, "resources": {"num_actors": 2}}), cluster_cpus=2)
    assert cpu["num_cpus"] == 0.5 and cpu["compute"].min_size == cpu["compute"].max_size == 2
    assert cpu["max_restarts"] >= 1 and cpu["max_task_retries"] >= 1
    gpu = actor_options(build_spec({**base, "resources": {"accelerator": "gpu"}}), 8)
    assert gpu["num_gpus"] == 1
    tpu = actor_options(build_spec({**base, "resources": {
        "accelerator": "tpu", "tpu_chips": 8, "accelerator_type": "TPU-V6E",
        "num_actors": None, "min_actors": 1, "max_actors": 4}}), 200)
    assert tpu["resources"] == {"TPU": 8} and tpu["accelerator_type"] == "TPU-V6E"
    assert (tpu["compute"].min_size, tpu["compute"].max_size) == (1, 4)


@pytest.mark.parametrize("data, message", [
    ({"output": "o"}, "input"),
    ({"input": "i", "output": "o", "task": "translate"}, "task"),
    ({"input": "i", "output": "o", "sampling": {"temperature": -1}}, "sampling.temperature"),
    ({"input": "i", "output": "o", "resources": {"min_actors": 4, "max_actors": 2}},
     "min_actors=4 is larger than max_actors=2"),
    ({"input": "i", "output": "o", "batch_size": 0}, "batch_size"),
    ({"input": [], "output": "o"}, "empty list"),
])
def test_malformed_specs(data, message):
    with pytest.raises(SpecError) as e:
        build_spec(data)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_flags_override_spec_file(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("input: a/\noutput: b/\nsampling: {max_new_tokens: 9, seed: 3}\n")
    args = build_parser().parse_args(["run", str(f), "--max-new-tokens", "5", "--min-actors",
                                      "1", "--max-actors", "3", "--resume"])
    spec = spec_from_args(args)
    assert spec.sampling.max_new_tokens == 5 and spec.sampling.seed == 3
    assert (spec.resources.min_actors, spec.resources.max_actors) == (1, 3)
    assert spec.resources.num_actors is None and spec.resume
