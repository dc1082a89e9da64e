"""Every class of user mistake through the real entry point: one line naming what and where, status 2,
no traceback (QWEN3TRAIN_DEBUG=1 shows it). A bug would still print its traceback and exit 1."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys

import pytest

from conftest import REPO

CASES = {
    # name: (arguments, text the one line must contain)
    "bad record": (["--config-name=stage1", "data.train_files=[{bad}]"], "bad.jsonl:1: field 'pos'"),
    "missing data file": (["--config-name=stage1", "data.train_files=[{tmp}/absent.jsonl]"], "absent.jsonl"),
    "unknown key": (["--config-name=stage1", "optim.lrr=1"], "optim.lrr"),
    "wrong type": (["--config-name=stage1", "optim.lr=abc"], "could not be converted to Float"),
    "refused value": (["--config-name=stage1", "model.padding_side=up"], "model.padding_side must be"),
    "not a model folder to merge": (["--config-name=merge", "inputs=[{model},{tmp}]", "run_dir=null",
                                     "output_dir={tmp}/m"], "no model.safetensors"),
    "unreadable model folder": (["--config-name=stage1", "model.name_or_path={tmp}/nomodel",
                                 "data.train_files=[{good}]"], "no such folder"),
    "no usable records to mine": (["--config-name=mine", "inputs=[{bad}]", "embedder={model}",
                                   "output={tmp}/mined/m.jsonl"], "no valid records"),
    "unknown command": (["--config-name=stage7"], "Cannot find primary config 'stage7'"),
    "bad line in a stage-0 corpus": (["--config-name=synth", "corpus=[{tmp}/notjson.jsonl]",
                                      "output_dir={tmp}/synth"], "notjson.jsonl:2: field '<json>': not valid JSON"),
    "persona file without personas": (["--config-name=synth", "corpus=[{tmp}/docs.jsonl]", "personas={bad}",
                                       "output_dir={tmp}/synth", "generator={model}"], "bad.jsonl:1: field 'persona'"),
    # (was a traceback from the hub client, status 1: stage 0 loaded its generator without `pretrained`)
    "missing stage-0 generator": (["--config-name=synth", "corpus=[{tmp}/docs.jsonl]", "backend=transformers",
                                   "generator={tmp}/nogenerator", "output_dir={tmp}/synth"],
                                  "nogenerator': no such folder"),
    "missing stage-0 generator under vLLM": (["--config-name=synth", "corpus=[{tmp}/docs.jsonl]", "backend=vllm",
                                             "generator={tmp}/nogenerator", "output_dir={tmp}/synth"],
                                            "nogenerator': no such folder"),
    # a name that could be the hub's (owner/name): vLLM tries the hub client (offline in the tests), then one line
    "stage-0 generator neither here nor on the hub": (["--config-name=synth", "corpus=[{tmp}/docs.jsonl]",
                                                       "backend=vllm", "generator=nogen/here", "output_dir={tmp}/synth"],
                                                      "cannot load vLLM's engine from 'nogen/here': "),
    "missing model for MTEB": (["--config-name=mteb", "model={tmp}/nothing/here", "collections=[{tmp}]"],
                               "nothing/here does not exist"),
    # one bad value per entry point: the same precision vocabulary everywhere, refused at compose time
    "stage precision": (["--config-name=stage2", "engine.precision=fp16"], "engine.precision must be one of"),
    "eval precision": (["--config-name=eval", "precision=half"], "eval.precision must be one of"),
    "mteb precision": (["--config-name=mteb", "precision=half"], "precision must be one of"),
    "merge precision": (["--config-name=merge", "dev_precision=int8"], "merge.dev_precision must be one of"),
    "synth precision": (["--config-name=synth", "persona_precision=fp8"], "synth.persona_precision must be one of"),
    "mine precision": (["--config-name=mine", "precision=tf32"], "mine.precision must be one of"),
    "filter threshold": (["--config-name=filter", "threshold=7"], "filter.threshold is a cosine"),
    "negative stall report": (["--config-name=mine", "stall_report_s=-5"], "mine.stall_report_s must be >= 0"),
    "negative stall report in stage 0": (["--config-name=synth", "stall_report_s=-1"],
                                         "synth.stall_report_s must be >= 0"),
    "prepare unknown key": (["--config-name=prepare", "mixx=3"], "mixx"),
    # a streamed JSONL with a line `datasets` cannot parse (it was a pyarrow traceback at the first batch)
    "malformed streamed file": (["--config-name=stage1", "data.train_files=[]", "run.max_steps=2",
                                 "data.mixture=[{{dataset: json, data_files: [{tmp}/notjson.jsonl], streaming: true}}]"],
                                "field '<block>': the `datasets` reader failed: ArrowInvalid"),
    # the same file loaded into `datasets`' Arrow cache (streaming: false): it was a DatasetGenerationError traceback
    "malformed file of a datasets source": (["--config-name=stage1", "data.train_files=[]", "run.max_steps=2",
                                             "data.mixture=[{{dataset: json, data_files: [{tmp}/notjson.jsonl]}}]"],
                                            "field '<block>': the `datasets` reader failed: ArrowInvalid"),
    # records are read at their byte offsets: a gzipped file was read as UTF-8 and refused at its first byte
    "compressed training file": (["--config-name=stage1", "data.train_files=[{tmp}/pairs.jsonl.gz]"],
                                 "pairs.jsonl.gz: a compressed file cannot be indexed"),
    "misspelt data format": (["--config-name=stage1", "data.mixture=[{{dataset:json,data_files:[{good}],format:tevatrn}}]"],
                             "format must be one of ('qwen3train', 'tevatron', 'sentence-transformers', 'ms-swift', 'labeled-pairs')"),
    # a config of the user's own --config-dir (README: configs that build on ours): it was Hydra's several lines and
    # status 1, the key unnamed; now the key is named
    "bad value in the user's own config": (["--config-dir={tmp}/conf", "--config-name=hot"],
                                           "could not be converted to Float (key loss.temperature)"),
    "misspelt key with the user's own configs": (["--config-dir", "{tmp}/conf", "--config-name=stage1",
                                                  "optim.lrr=1"], "Key 'lrr' not in 'OptimConfig'"),
    # a sweep (-m) was left to Hydra unchecked: its several lines and status 1; now every swept value is composed
    "misspelt key in a sweep": (["--config-name=stage1", "-m", "optim.lrr=1e-4,2e-4"], "Key 'lrr' not in 'OptimConfig'"),
    "bad second value of a sweep": (["--config-name=stage1", "-m", "optim.lr=1e-4,abc", "run.seed=range(0,2)"],
                                    "override optim.lr=abc Value 'abc' of type 'str' could not be converted to Float"),
    "group option that is not there": (["--config-name=stage2", "model=qwen3-06b"],
                                       "Could not find 'model/qwen3-06b' Available options in 'model': "
                                       "qwen2.5-coder-0.5b, qwen3-0.6b, qwen3-4b"),
    # ms-swift's rows given as our JSONL: "field 'query': missing" alone before format ms-swift existed
    "ms-swift rows as our JSONL": (["--config-name=stage1", "data.train_files=[{tmp}/swift.jsonl]"],
                                   "swift.jsonl:1: field 'query': missing (ms-swift's rows: read them with format: "
                                   "ms-swift, as a `datasets` source: data.mixture=[{dataset: json, data_files: ["),
    "one file where a list belongs": (["--config-name=stage1", "data.train_files={good}"],
                                      "(a list: data.train_files=[...], e.g. data.train_files=[a,b])"),
    "negative stream retries": (["--config-name=stage1", "data.stream_retries=-1"], "data.stream_retries must be >= 0"),
    "floor above the learning rate": (["--config-name=stage2", "optim.min_lr_ratio=1.5"], "optim.min_lr_ratio is a share"),
    # values no run can use, refused before anything loads (they were tracebacks deep in a run, or silently
    # wrong: a negative Matryoshka dim sliced from the end, num_negatives=-1 dropped the last negative)
    "no room for content": (["--config-name=stage1", "model.max_doc_length=1"], "model.max_doc_length must be >= 2"),
    "a beta of Adam above 1": (["--config-name=stage1", "optim.betas=[1.5,0.9]"], "optim.betas must be two numbers"),
    "LoRA of rank 0": (["--config-name=stage1", "model.lora.r=0"], "model.lora.r must be >= 1"),
    "negative negatives to mine": (["--config-name=mine", "num_negatives=-1"], "mine.num_negatives must be >= 1"),
    "empty encoding chunks": (["--config-name=filter", "batch_size=0"], "filter.batch_size must be >= 1"),
    "a negative Matryoshka dimension": (["--config-name=eval", "dims=[64,-8]"], "eval.dims must be >= 1, got -8"),
    "empty stage-0 shards": (["--config-name=synth", "shard_size=0"], "synth.shard_size must be >= 1"),
    "everything held out": (["--config-name=synth", "heldout_fraction=1.5"], "synth.heldout_fraction must be in [0, 1)"),
    # user settings met after the config was read (they were ValueError tracebacks; errors.ConfigError now)
    "reranker without negatives": (["--config-name=rerank", "model.name_or_path={model}", "model.init_from=null",
                                    "data.train_files=[{pairs}]", "data.num_hard_negatives=0",
                                    "run.output_dir={tmp}/rr"], "the reranker needs data.num_hard_negatives >= 1"),
    "a query template that does not end with the query": (["--config-name=stage1", "model.query_template='{{query}} ({{instruction}})'"],
                                                           "model.query_template must end with {query}"),
    "bad record in a prepare source": (["--config-name=prepare", "sources=[{{path:{bad}}}]", "output={tmp}/mix.jsonl"],
                                       "bad.jsonl:1: field 'pos'"),
    "negative stall report in evaluation": (["--config-name=eval", "stall_report_s=-1"], "eval.stall_report_s must be >= 0"),
    "pipeline precision": (["--config-name=pipeline", "eval.precision=double"], "eval.precision must be one of"),
    # checked when the run knows its process count (it was a ValueError traceback and status 1)
    "micro batch not dividing the batch": (["--config-name=stage1", "data.train_files=[{good}]",
                                            "engine.global_batch_size=12", "engine.micro_batch_size=8"],
                                           "per-process batch 12 (engine.global_batch_size / 1 processes) is not "
                                           "divisible by engine.micro_batch_size=8"),
    "hub repo id": (["--config-name=stage1", "export.push_to_hub=my model"], "export.push_to_hub must be a hub repo id"),
    # training that diverges (every step's loss non-finite): no traceback, the last good checkpoint named
    "diverged training": (["--config-name=stage1", "data.train_files=[{pairs}]", "loss.temperature=1e-45",
                           "run.skip_nonfinite_steps=0", "engine.global_batch_size=4", "engine.micro_batch_size=4",
                           "run.max_steps=2"], "non-finite loss (nan) or gradients (norm nan) at step 1"),
}


@pytest.mark.parametrize("args", [["--config-name=eval", "precision=fp32"], ["--config-name=stage1", "engine.precision=bfloat16"],
                                  ["--config-name=mine", "precision=bf16"], ["--config-name=mteb", "precision=float32"]])
def test_both_spellings_of_a_precision_are_accepted(args):
    """bf16/bfloat16 and fp32/float32 name the same thing in every command (precheck composes and converts
    the config: a refused value would exit 2)."""
    from qwen3train.cli.main import precheck

    assert precheck(args) == args


def test_a_new_key_of_a_mapping_needs_no_plus():
    """instructions.my-task=... adds an entry to a mapping field (Hydra alone wants +instructions.my-task);
    a new key of a dataclass is still a typo and still refused."""
    from qwen3train.cli.main import precheck

    assert precheck(["--config-name=mteb", "instructions.my-task=Find it"]) == [
        "--config-name=mteb", "+instructions.my-task=Find it"]
    assert precheck(["--config-name=stage1", "data.task_instructions.qa=Answer it"])[-1].startswith("+data.")
    with pytest.raises(SystemExit) as e:
        precheck(["--config-name=stage1", "model.hiden=3"])
    assert e.value.code == 2


def test_a_mapping_given_whole_replaces_the_default_one(compose):
    """README's `make eval ARGS="models={ours:outputs/merged,minilm:...}"` kept the default entry beside them
    (Hydra merges a mapping into the default): it evaluated outputs/stage2/final too, or stopped with "Path
    outputs/stage2/final not found" before a stage 2 had run; `make synth ARGS="task_mix={retrieval:1.0}"` kept the
    other tasks of the default mix at 0.1 each, silently. A mapping given whole replaces it (the same
    keys or none included); a section of a schema given whole still sets only the fields it names."""
    from qwen3train.cli.main import precheck

    for given, want in (("{ours:/a,minilm:/b}", {"ours": "/a", "minilm": "/b"}), ("{stage2:/a}", {"stage2": "/a"}),
                        ("{}", {})):
        argv = precheck(["--config-name=eval", f"models={given}", "pairs=[]"])
        assert argv == ["--config-name=eval", "~models", f"+models={given}", "pairs=[]"]
        assert compose("eval", argv[1:]).models == want
    argv = precheck(["--config-name=synth", "task_mix={retrieval:1.0}"])  # the keys of the default: merged, it kept
    assert compose("synth", argv[1:]).task_mix == {"retrieval": 1.0}  # sts, bitext, classification at 0.1 each
    argv = precheck(["--config-name=stage1", "optim={lr:1e-4}"])
    cfg = compose("stage1", argv[1:])
    assert argv[1:] == ["optim={lr:1e-4}"] and cfg.optim.lr == 1e-4 and cfg.optim.weight_decay == 0.01


def test_a_mixture_on_the_command_line_replaces_the_configs_training_files(compose):
    """Every stage's config names its demo files in data.train_files, so the README's
    `data.mixture=[{dataset: ..., format: tevatron}]` stopped with "set data.train_files or data.mixture, not both"
    unless data.train_files=[] was typed too. A mixture given alone now replaces them; both given on the command line
    are still refused."""
    from qwen3train.cli.main import precheck

    mix = "data.mixture=[{dataset: json, data_files: [a.jsonl], format: ms-swift}]"
    for name in ("stage1", "stage2", "rerank"):
        argv = precheck([f"--config-name={name}", mix, "run.max_steps=3"])
        assert argv == [f"--config-name={name}", mix, "run.max_steps=3", "data.train_files=[]"], argv
        cfg = compose(name, argv[1:])
        assert cfg.data.train_files == [] and cfg.data.mixture[0].format == "ms-swift"
    assert precheck(["--config-name=stage1", "data.train_files=[b.jsonl]"]) == ["--config-name=stage1",
                                                                                 "data.train_files=[b.jsonl]"]
    with pytest.raises(SystemExit) as e:
        precheck(["--config-name=stage1", mix, "data.train_files=[b.jsonl]"])
    assert e.value.code == 2


def test_the_users_own_config_dir_is_checked_as_ours(compose, tmp_path, capsys):
    """README: `--config-dir=my_configs` adds a folder whose files build on ours; such a command was left to Hydra
    unchecked (its errors several lines and status 1, the key of a bad value in a file unnamed). Now composed as the
    run composes it: the user's primary config (its defaults from ours), a group option of the user's beside ours,
    both spellings of the flag; a folder that is not there is one line."""
    from qwen3train.cli.main import precheck

    conf = tmp_path / "conf"
    (conf / "model").mkdir(parents=True)
    (conf / "myrun.yaml").write_text("defaults: [stage2, {override model: small}, _self_]\noptim:\n  lr: 3e-5\n")
    (conf / "model" / "small.yaml").write_text("defaults: [tiny, _self_]\nmax_query_lenght: 12\n")
    mix = "data.mixture=[{files: [a.jsonl]}]"
    for flag in (["--config-dir", str(conf)], [f"--config-dir={conf}"], ["-cd", str(conf)]):
        with pytest.raises(SystemExit) as e:  # the user's group option misspells a key of ours
            precheck([*flag, "--config-name=myrun", "optim.lr=1e-4"])
        assert e.value.code == 2
        assert "Key 'max_query_lenght' not in 'ModelConfig'" in capsys.readouterr().err
    (conf / "model" / "small.yaml").write_text("defaults: [tiny, _self_]\nmax_query_length: 12\n")
    argv = precheck([f"--config-dir={conf}", "--config-name=myrun", mix])
    assert argv == [f"--config-dir={conf}", "--config-name=myrun", mix, "data.train_files=[]"]  # composed: rewritten
    argv = precheck([f"--config-dir={conf}", "--config-name=stage1", "model=small"])  # ours, with the user's option
    assert argv == [f"--config-dir={conf}", "--config-name=stage1", "model=small"]
    import qwen3train.cli.check as check

    with pytest.MonkeyPatch.context() as mp:  # a source tree whose configs are no package: ours found by path
        mp.setattr(check, "_config_path", lambda: "../../configs")
        assert precheck([f"--config-dir={conf}", "--config-name=myrun", mix])[-1] == "data.train_files=[]"
    with pytest.raises(SystemExit):
        precheck([f"--config-dir={conf}", "--config-name=stage1", "model=smal"])
    assert "Could not find 'model/smal'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        precheck([f"--config-dir={tmp_path}/nothere", "--config-name=stage1"])
    assert capsys.readouterr().err.strip() == f"error: --config-dir {tmp_path}/nothere: no such folder"
    # Hydra reads ours first: a file of the user's named like one of ours is never read (the run would run ours)
    (conf / "stage2.yaml").write_text("defaults: [stage2, _self_]\noptim:\n  lr: 3e-5\n")
    with pytest.raises(SystemExit):
        precheck([f"--config-dir={conf}", "--config-name=stage2"])
    assert "stage2.yaml has the name of one of ours, which is read first: yours would not be used" in \
        capsys.readouterr().err
    (conf / "stage2.yaml").unlink()
    (conf / "model" / "tiny.yaml").write_text("name: tiny\n")
    assert precheck([f"--config-dir={conf}", "--config-name=myrun"]) == [f"--config-dir={conf}", "--config-name=myrun"]
    assert "note: model/tiny.yaml in --config-dir" in capsys.readouterr().err
    # a group option of the user's hidden by ours is refused where the run chooses it (by name or by a config's
    # defaults), not only noted: `engine=zero2` with the user's edited engine/zero2.yaml trained with ours
    with pytest.raises(SystemExit):  # (stage1 chooses model=tiny by default)
        precheck([f"--config-dir={conf}", "--config-name=stage1"])
    assert "model/tiny.yaml has the name of one of ours" in capsys.readouterr().err
    (conf / "model" / "tiny.yaml").unlink()
    (conf / "engine").mkdir()
    (conf / "engine" / "zero2.yaml").write_text("defaults: [zero3, _self_]\n")
    (conf / "sharded.yaml").write_text("defaults: [stage1, {override engine: zero2}, _self_]\n")
    for argv in (["--config-name=stage1", "engine=zero2"], ["--config-name=sharded"],
                 ["--config-name=stage1", "-m", "engine=torch,zero2"]):
        with pytest.raises(SystemExit) as e:
            precheck([f"--config-dir={conf}", *argv])
        assert e.value.code == 2
        assert "engine/zero2.yaml has the name of one of ours, which is read first: this run (engine=zero2) would " \
               "use ours, not yours; give yours another name (engine/my_zero2.yaml, then engine=my_zero2" in \
               capsys.readouterr().err, argv
    assert precheck([f"--config-dir={conf}", "--config-name=stage1", "engine=zero3"])[-1] == "engine=zero3"
    (conf / "engine" / "zero2.yaml").rename(conf / "engine" / "my_zero2.yaml")  # the advice, which builds on ours
    from hydra import compose

    with check._initialize(str(conf)):
        cfg = compose(config_name="stage1", overrides=["engine=my_zero2"])
    assert (cfg.engine.backend, cfg.engine.zero_stage) == ("deepspeed", 3)


def test_a_sweep_is_composed_value_by_value_before_any_job_starts(capsys):
    """Under -m every value of every swept key is composed (with the other keys' first values); what every job
    shares is respelled as without -m (a mixture replacing the config's files); a glob is the group options it
    matches, an interval its two ends, refused under the basic sweeper (Hydra's traceback before). A check of
    the first combination alone would let the second job of a night's sweep die on a typo after the first had
    trained."""
    from qwen3train.cli.check import _sweep
    from qwen3train.cli.main import precheck

    assert _sweep(["optim.lr=1e-4,2e-4", "run.seed=range(0,3)", "engine=zero2"]) == [
        ["optim.lr=0.0001", "run.seed=0", "engine=zero2"], ["optim.lr=0.0002", "run.seed=0", "engine=zero2"],
        ["optim.lr=0.0001", "run.seed=1", "engine=zero2"], ["optim.lr=0.0001", "run.seed=2", "engine=zero2"]]
    # an interval at both ends; a glob as the group options it matches (Hydra's basic sweeper's own reading)
    assert _sweep(["optim.lr=interval(1e-5,1e-3)", "run.seed=1"]) == [["optim.lr=1e-05", "run.seed=1"],
                                                                      ["optim.lr=0.001", "run.seed=1"]]
    assert _sweep(["model=glob(qwen3*,exclude=qwen3-8b)"], lambda g: ["qwen3-0.6b", "qwen3-4b", "qwen3-8b", "tiny"]) \
        == [["model=qwen3-0.6b"], ["model=qwen3-4b"]]
    sweep = ["--config-name=stage1", "-m", "optim.lr=1e-4,2e-4", "model=tiny,qwen3-0.6b"]
    assert precheck(sweep) == sweep
    mix = "data.mixture=[{files: [a.jsonl]}]"
    assert precheck([*sweep, mix]) == [*sweep, mix, "data.train_files=[]"]
    with pytest.raises(SystemExit) as e:
        precheck(["--config-name=stage1", "--multirun", "optim.lr=1e-4", "model=tiny,qwen3-0.6b,qwen3-9b"])
    assert e.value.code == 2
    glob = ["--config-name=stage1", "-m", "model=glob(qwen3-0*,tin*)"]
    assert precheck(glob) == glob
    for argv, needle in (
            (["model=glob(qwen9*)"], "error: model=glob(qwen9*): matches no option of config group 'model' (options: "
                                     "qwen2.5-coder-0.5b, qwen3-0.6b"),
            (["model=glob(tin*)", "optim.lr=1e-4,abc"], "could not be converted to Float"),  # the other key's values
            # under the basic sweeper (the default) an interval was Hydra's traceback, status 1
            (["optim.lr=interval(1e-5,1e-3)"], "error: optim.lr=interval(1e-5,1e-3): an interval is sampled by an "
                                               "optimizing sweeper (hydra/sweeper=optuna")):
        with pytest.raises(SystemExit) as e:
            precheck(["--config-name=stage1", "-m", *argv])
        assert e.value.code == 2 and needle in capsys.readouterr().err, argv


def test_the_command_may_come_after_the_flags(tmp_path):
    """`qwen3train --config-dir=my_configs mine ...` (the flags first, as Hydra users write them) was "Error parsing
    override 'mine' missing EQUAL": the command was taken for an override. It is found after --config-dir DIR, -cd DIR
    and -m; Hydra's own spelling (--config-name=...) names no command."""
    from qwen3train.cli.main import _command_at

    assert _command_at(["--config-dir=my", "mine", "a=1"]) == 1 and _command_at(["-cd", "my", "-m", "mine"]) == 3
    assert _command_at(["stage1", "--config-dir=my"]) == 0 and _command_at(["--config-name=x", "--config-dir=my"]) == 0
    assert _command_at(["--config-dir=my", "a=1"]) == 0  # no command: its own error, as before
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "myrun.yaml").write_text("defaults: [stage1, _self_]\noptim:\n  lr: 3.5e-05\n")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-c", "import sys; from qwen3train.cli.main import cli; "
                           "sys.argv[0] = 'qwen3train'; cli()", "--config-dir", str(tmp_path / "conf"), "myrun",
                           "run.max_steps=3", "--cfg", "job"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "lr: 3.5e-05" in proc.stdout and "max_steps: 3" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.parametrize("argv, needle", [
    (["--config-name=stage7"], "Cannot find primary config 'stage7'"),
    (["stage7", "optim.lr=1"], "Cannot find primary config 'stage7'"),
    (["optim.lr=1"], "the first argument is the command (eval, filter, merge, mine"),
    (["--config-name=stage1", "optim.lrr=1"], "optim.lrr")])
def test_the_installed_command_takes_both_spellings(argv, needle, tmp_path):
    """``qwen3train stage1 ...`` and, as ``python -m`` and the Makefile spell it, ``qwen3train --config-name=stage1
    ...``; an override where the command belongs is named as such. Would catch: the flag taken as a command's name
    (before: "Cannot find primary config '--config-name=stage7'"), Hydra's message about a config named
    'optim.lr=1' in place of the command's list."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.pop("QWEN3TRAIN_DEBUG", None)
    proc = subprocess.run([sys.executable, "-c", "import sys; from qwen3train.cli.main import cli; "
                           "sys.argv[0] = 'qwen3train'; cli()", *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and needle in last, last


@pytest.fixture(scope="module")
def entry_point():
    """``python -m qwen3train.cli.main`` in processes forked from one that has imported its dependencies once
    (tests/zygote.py: ~2 s less a command on 2 cores)."""
    from zygote import Zygote

    server = Zygote()
    yield server
    server.close()


@pytest.mark.parametrize("case", sorted(CASES))
def test_user_mistake_is_one_line_and_status_2(case, entry_point, tiny_model_dir, tmp_path):
    args, needle = CASES[case]
    (tmp_path / "bad.jsonl").write_text('{"query": "q", "pos": "not a list"}\n')
    (tmp_path / "good.jsonl").write_text('{"query": "q", "pos": ["p"]}\n')
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "hot.yaml").write_text("defaults: [stage2, _self_]\nloss:\n  temperature: hot\n")
    (tmp_path / "swift.jsonl").write_text('{"messages": [{"role": "user", "content": "q"}], '
                                          '"positive_messages": [[{"role": "user", "content": "p"}]]}\n')
    (tmp_path / "notjson.jsonl").write_text('{"text": "a document about rivers and their deltas"}\n{"text": oops}\n')
    (tmp_path / "docs.jsonl").write_text('{"text": "' + "a long enough document about rivers " * 10 + '"}\n')
    (tmp_path / "pairs.jsonl").write_text("".join(f'{{"query": "question {i}", "pos": ["answer {i}"]}}\n' for i in range(8)))
    (tmp_path / "pairs.jsonl.gz").write_bytes(gzip.compress((tmp_path / "pairs.jsonl").read_bytes()))
    fill = {"bad": tmp_path / "bad.jsonl", "good": tmp_path / "good.jsonl", "tmp": tmp_path, "model": tiny_model_dir,
            "pairs": tmp_path / "pairs.jsonl"}
    argv = [a.format(**fill) for a in args] + [f"model.name_or_path={tiny_model_dir}"] * (
        args[0] == "--config-name=stage1" and not any(a.startswith("model.name_or_path") for a in args))
    argv += [f"run.output_dir={tmp_path}/run"] if args[0] == "--config-name=stage1" else []
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.pop("QWEN3TRAIN_DEBUG", None)
    proc = entry_point.run(argv, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and needle in last, last


def test_the_forked_entry_point_answers_as_a_fresh_process(entry_point, tmp_path):
    """The test above reads commands run by tests/zygote.py: each must give what a fresh ``python -m`` gives (exit
    status, stdout, stderr's last line) for a user's mistake, for the same mistake with QWEN3TRAIN_DEBUG=1 (the
    traceback: a variable the test sets must reach the command) and for a command that succeeds (the composed
    config on stdout). Would catch a fork server that loses the environment, the working folder, output written just
    before the exit, or maps the exit status wrongly."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.pop("QWEN3TRAIN_DEBUG", None)
    mistake = ["--config-name=stage1", "optim.lrr=1"]
    cases = [(mistake, env), (mistake, dict(env, QWEN3TRAIN_DEBUG="1")),
             (["--config-name=stage1", "data.train_files=[x.jsonl]", "--cfg", "job"], env)]
    for argv, case_env in cases:
        fresh = subprocess.run([sys.executable, "-m", "qwen3train.cli.main", *argv], cwd=tmp_path, env=case_env,
                               capture_output=True, text=True, timeout=300)
        forked = entry_point.run(argv, cwd=tmp_path, env=case_env)
        assert (forked.returncode, forked.stdout) == (fresh.returncode, fresh.stdout), (argv, forked, fresh)
        assert forked.stderr.strip().splitlines()[-1:] == fresh.stderr.strip().splitlines()[-1:], (argv, forked, fresh)
        assert ("Traceback" in forked.stderr) == ("QWEN3TRAIN_DEBUG" in case_env), (argv, forked.stderr[-2000:])
    assert "x.jsonl" in forked.stdout and forked.returncode == 0


def test_a_full_disk_anywhere_is_one_line():
    """A write that meets a full disk outside the writers that name their file (``errors.writing``) is still a
    user's problem, not a bug: one line saying what is kept, printed by the rank that met it (not only rank 0)."""
    import errno

    from qwen3train.cli.main import user_error

    msg = user_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    assert msg.startswith("no space left on the device") and "rerun the same command" in msg
    assert user_error(RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos; file write failed"))
    assert user_error(OSError(errno.EIO, "Input/output error")) is None  # a failing disk stays a traceback


def test_a_fatal_signal_prints_the_python_stacks(tmp_path):
    """A rank that dies of SIGABRT in its teardown (a native library's std::terminate) used to leave only
    torchrun's "exitcode -6": the entry point enables faulthandler, so the process prints where each thread was.
    Fails if the command line no longer enables it."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", QWEN3TRAIN_TEST_FAULT="abort_at_exit",
               PYTHONPATH=os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
    for k in ("QWEN3TRAIN_DEBUG", "PYTHONFAULTHANDLER"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "faults.py"), "--config-name=stage1",
                           f"data.train_files=[{tmp_path}/absent.jsonl]"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -6, (proc.returncode, proc.stderr[-2000:])
    assert "Fatal Python error: Aborted" in proc.stderr and "most recent call first" in proc.stderr, proc.stderr[-2000:]

