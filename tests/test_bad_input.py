"""Every CLI subcommand through a table of bad inputs: each gives its exit code, exactly one line
on stderr (``jaxlm: error: ...``), no traceback, and changes no file of a previous run.

The table runs in process through ``jaxlm.cli.main(argv)``; most inputs fail in argument or
config validation before anything is compiled. A few run as real subprocesses (marked slow).
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest
from flax import nnx

import jaxlm
from jaxlm.interop.hf import to_hf
from jaxlm.checkpoint import Checkpointer
from jaxlm.cli import main
from jaxlm.prepare import prepare_chat, prepare_data
from tests.conftest import REPO, file_hashes, tiny_config, xla_flags

TINY = os.path.join(REPO, "configs", "tiny.yaml")
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|endoftext|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def load_tokenizer_json_text() -> str:
    from jaxlm.data import tokenizer_file

    return tokenizer_file().read_text(encoding="utf-8")
NOT_UTF8 = "caf\xe9 au lait\n".encode("latin-1")  # byte 3 is 0xe9


def _immutable(path: pathlib.Path) -> bool:
    """Make ``path`` unwritable even for root (``chattr +i``); False where the file system cannot."""
    os.chmod(path, 0o555)
    if not os.access(path, os.W_OK):
        return True  # not root: the mode is enough
    return subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A previous run (a params-only checkpoint at steps 1 and 2, step 2 corrupt in a copy),
    prepared data, and bad files of every kind."""
    d = tmp_path_factory.mktemp("world")
    cfg = tiny_config(f"checkpoint.dir={d / 'run'}")
    model = jaxlm.build_model(cfg.model, seed=0)
    ckpt = Checkpointer(d / "run", cfg.checkpoint)
    for step in (1, 2):
        ckpt.save(step, nnx.state(model), None, 0, cfg)
        ckpt.wait()
    ckpt.close()
    (d / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 8.3}\n{"step": 2, "loss": 8.2}\n')
    _lora_run(d / "lora_run", model)
    corrupt = d / "corrupt"
    subprocess.run(["cp", "-r", str(d / "run"), str(corrupt)], check=True)
    for f in (corrupt / "2" / "params").rglob("d/*"):
        f.write_bytes(b"\0" * 8)
    (d / "good.txt").write_text("To be, or not to be, that is the question.\n")
    (d / "latin1.txt").write_bytes(NOT_UTF8)
    (d / "binary.jsonl").write_bytes(b'{"text": "ok"}\n' + bytes(range(128, 256)) + b"\n")
    (d / "notobj.jsonl").write_text('{"text": "ok"}\n[1, 2]\n')
    (d / "empty.txt").write_text("")
    (d / "table.csv").write_text("a,b\n")
    (d / "latin1.yaml").write_bytes(b"train:\n  steps: 3 # caf\xe9\n")
    (d / "bad.yaml").write_text("train: [1, 2\n")
    (d / "list.yaml").write_text("- 1\n- 2\n")
    (d / "afile").write_text("not a directory\n")
    (d / "twice.yaml").write_text("model:\n  embed_dim: 64\ntrain:\n  steps: 3\nmodel:\n  num_layers: 2\n")
    (d / "not_tokenizer.json").write_text('{"hello": "world"}\n')
    (d / "garbage.gguf").write_bytes(b"GGUF" + bytes(60))
    (d / "empty_dir").mkdir()
    to_hf(model, cfg, d / "truncated_hf")  # a Hugging Face directory whose weights file was cut short
    with open(d / "truncated_hf" / "model.safetensors", "r+b") as f:
        f.truncate(4096)
    prepare_data([str(d / "good.txt")], str(d / "data"))
    (d / "chat_tok").mkdir()  # the embedded tokenizer with a ChatML template beside it
    (d / "chat_tok" / "tokenizer.json").write_text(load_tokenizer_json_text(), encoding="utf-8")
    (d / "chat_tok" / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML, "eos_token": "<|endoftext|>"}))
    good_chat = '{"messages": [{"role": "user", "content": "Who?"}, {"role": "assistant", "content": "Me."}]}\n'
    (d / "chat_badjson.jsonl").write_text(good_chat + '{"messages": [\n')
    (d / "chat_role.jsonl").write_text(good_chat + '{"messages": [{"role": "narrator", "content": "Once"}]}\n')
    (d / "chat_empty.jsonl").write_text(good_chat + good_chat + '{"messages": []}\n')
    (d / "chat_ok.jsonl").write_text(good_chat + '{"prompt": "Who?", "completion": "You."}\n')
    (d / "chat_noanswer.jsonl").write_text('{"prompt": "Who?", "completion": 3}\n')
    (d / "chat_both.jsonl").write_text(good_chat + '{"prompt": "Who?", "completion": "You.", "messages": []}\n')
    (d / "chat_nocontent.jsonl").write_text('{"messages": [{"role": "user"}, {"role": "assistant", "content": "Me."}]}\n')
    prepare_chat([str(d / "chat_ok.jsonl")] * 4, str(d / "chat_data"), str(d / "chat_tok" / "tokenizer.json"), seq_len=64)
    (d / "locked").mkdir()
    (d / "locked" / "keep.txt").write_text("kept\n")
    locked = _immutable(d / "locked")
    yield d, locked
    subprocess.run(["chattr", "-i", str(d / "locked")], capture_output=True)
    os.chmod(d / "locked", 0o755)


def _lora_run(directory: pathlib.Path, base) -> None:
    """A LoRA run (rank 8 on q, v over the random base of train.seed=0) saved at step 1, as jaxlm.train saves it."""
    from jaxlm.checkpoint import tree_checksum
    from jaxlm.lora import LoRAParam, init_adapters
    from jaxlm.optim import make_optimizer

    cfg = tiny_config(f"checkpoint.dir={directory}", "train.lora.rank=8")
    adapters = init_adapters(cfg.model, cfg.train.lora, None, cfg.train.seed)
    base = {"reference": "random init (train.seed=0)", "checksum": tree_checksum(nnx.state(base, nnx.Not(LoRAParam)))}
    ckpt = Checkpointer(directory, cfg.checkpoint)
    ckpt.save(1, adapters, make_optimizer(cfg.train).init(adapters), 1, cfg, extra_meta={"lora_base": base})
    ckpt.wait()
    ckpt.close()


# (subcommand, argv with {d} for the world directory, exit code, a fragment of the one line)
TABLE = [
    # ---- the command line itself (argparse)
    ("-", [], 2, "the following arguments are required: command"),
    ("-", ["fly"], 2, "invalid choice: 'fly'"),
    ("-", ["--version-of-nothing"], 2, "the following arguments are required"),
    ("rules", ["rules", "extra"], 2, "unrecognized arguments: extra"),
    ("rules", ["rules", "--table"], 2, "unrecognized arguments: --table"),
    # ---- train: arguments, config files, overrides, bounds, paths
    ("train", ["train"], 2, "the following arguments are required: config"),
    ("train", ["train", TINY, "--forse"], 2, "unrecognized arguments: --forse"),
    ("train", ["train", "{d}/twice.yaml"], 2, "has key 'model' twice (lines 1 and 5)"),
    ("train", ["train", "{d}/missing.yaml"], 2, "does not exist"),
    ("train", ["train", "{d}/empty_dir"], 2, "is a directory, not a file"),
    ("train", ["train", "{d}/latin1.yaml"], 2, "is not UTF-8 text (byte 23 is 0xe9)"),
    ("train", ["train", "{d}/bad.yaml"], 2, "is not valid YAML"),
    ("train", ["train", "{d}/list.yaml"], 2, "must hold a mapping of sections"),
    ("train", ["train", TINY, "train.step=3"], 2, "unknown config key 'train.step'; did you mean 'steps'?"),
    ("train", ["train", TINY, "modle.num_layers=3"], 2, "unknown config key 'modle'"),
    ("train", ["train", TINY, "train.steps"], 2, "must look like section.key=value"),
    ("train", ["train", TINY, "train.steps=ten"], 2, "'train.steps' must be int"),
    ("train", ["train", TINY, "train.steps=["], 2, "does not parse"),
    ("train", ["train", TINY, "train.steps={a: 1"], 2, "does not parse"),
    ("train", ["train", TINY, "train.steps=2.5"], 2, "'train.steps' must be a whole number"),
    ("train", ["train", TINY, "train.learning_rate=.nan"], 2, "'train.learning_rate' must be a finite number"),
    ("train", ["train", TINY, "train.learning_rate=.inf"], 2, "'train.learning_rate' must be a finite number"),
    ("train", ["train", TINY, "train.learning_rate=-1e-3"], 2, "'train.learning_rate' must be positive"),
    ("train", ["train", TINY, "train.learning_rate=fast"], 2, "'train.learning_rate' must be float"),
    ("train", ["train", TINY, "train.beta1=1.0"], 2, "'train.beta1' must be in [0, 1)"),
    ("train", ["train", TINY, "train.beta2=2"], 2, "'train.beta2' must be in [0, 1)"),
    ("train", ["train", TINY, "train.eps=0"], 2, "'train.eps' must be positive"),
    ("train", ["train", TINY, "train.weight_decay=-1"], 2, "'train.weight_decay' must be >= 0"),
    ("train", ["train", TINY, "train.grad_clip=-.inf"], 2, "'train.grad_clip' must be a finite number"),
    ("train", ["train", TINY, "train.loss_scale_init=0"], 2, "'train.loss_scale_init' must be >= 1"),
    ("train", ["train", TINY, "model.rope_theta=0"], 2, "'model.rope_theta' must be positive"),
    ("train", ["train", TINY, "model.norm_eps=.nan"], 2, "'model.norm_eps' must be a finite number"),
    ("train", ["train", TINY, "model.init_std=-0.02"], 2, "'model.init_std' must be positive"),
    ("train", ["train", TINY, "model.vocab_size=1e20"], 2, "'model.vocab_size' must be a whole number"),
    ("train", ["train", TINY, "model.vocab_size=100000000000000000000"], 2, "too large to allocate"),
    ("train", ["train", TINY, "model.vocab_size=2000000000"], 2, "GiB (parameters, gradients, optimizer moments"),
    ("train", ["train", TINY, "train.batch_size=1e12"], 2, "'train.batch_size' must be a whole number"),
    ("train", ["train", TINY, "train.batch_size=1000000000000"], 2, "too large to allocate"),
    ("train", ["train", TINY, "train.batch_size=0"], 2, "'train.batch_size' must be positive"),
    ("train", ["train", TINY, "train.batch_size=12"], 2, "not divisible by the data-parallel size"),
    ("train", ["train", TINY, "train.warmup_steps=1000"], 2, "'train.warmup_steps' must be in [0, train.steps=50]"),
    ("train", ["train", TINY, "data.val_fraction=1.5"], 2, "'data.val_fraction' must be in (0, 1)"),
    ("train", ["train", TINY, "data.seq_len=1"], 2, "'data.seq_len' must be >= 2"),
    ("train", ["train", TINY, "data.loss_on=assistants"], 2, "'data.loss_on' is 'assistants'; choose one of assistant, all, last_turn"),
    ("train", ["train", TINY, "model.num_heads=3"], 2, "is not divisible by model.num_kv_heads"),
    ("train", ["train", TINY, "model.remat=some"], 2, "'model.remat' is 'some'"),
    ("train", ["train", TINY, "mesh.data=3"], 2, "cannot fill 8 devices"),
    ("train", ["train", TINY, "mesh.data=-1", "mesh.fsdp=-1"], 2, "may be -1"),
    ("train", ["train", TINY, "checkpoint.dir={d}/afile"], 2, "is a file, not a directory"),
    ("train", ["train", TINY, "checkpoint.dir={d}/afile/run"], 2, "is a file, not a directory"),
    ("train", ["train", TINY, "checkpoint.dir={d}/run", "model.embed_dim=32"], 2, "holds a run with a different model"),
    ("train", ["train", TINY, "data.text_path={d}/latin1.txt"], 65, "is not UTF-8 text: byte 3 is 0xe9"),
    ("train", ["train", TINY, "data.text_path={d}/missing.txt"], 2, "does not exist"),
    ("train", ["train", TINY, "data.text_path={d}/empty_dir"], 2, "text file '{d}/empty_dir' is a directory, not a file"),
    ("train", ["train", TINY, "data.text_path={d}/good.txt"], 2,
     "the corpus (data.text_path '{d}/good.txt') has 14 tokens: too few for data.seq_len=64"),
    ("train", ["train", TINY, "data.tokenizer_path={d}/chat_tok"], 2,
     "'{d}/chat_tok' is a directory, not a file; point to '{d}/chat_tok/tokenizer.json'"),
    ("train", ["train", TINY, "data.path={d}/afile"], 2, "is not a directory"),
    ("train", ["train", TINY, "data.path={d}/empty_dir"], 2, "has no meta.json"),
    ("train", ["train", TINY, "data.path={d}/chat_data", "data.tokenizer_path={d}/chat_tok/tokenizer.json",
               "data.seq_len=4"], 2, "no token of the chat data is trained with data.loss_on=assistant"),
    ("train", ["train", TINY, "data.tokenizer_path={d}/not_tokenizer.json"], 2, "is not a Hugging Face tokenizer.json"),
    ("train", ["train", TINY, "data.path={d}/data", "data.text_path={d}/good.txt"], 2, "not both"),
    ("train", ["train", TINY, "model.init_from={d}/missing"], 2, "model.init_from '{d}/missing' does not exist"),
    ("train", ["train", TINY, "model.init_from={d}/good.txt"], 2, "is neither a .gguf file"),
    ("train", ["train", TINY, "model.init_from={d}/garbage.gguf"], 65, "is not a readable GGUF file"),
    ("train", ["train", TINY, "model.init_from={d}/truncated_hf"], 65, "is not a readable safetensors file"),
    ("train", ["train", TINY, "model.init_from="], 2, "model.init_from is empty; give the path of a pretrained model"),
    ("train", ["train", TINY, "model.init_from={d}/run", "model.num_layers=3"], 2,
     "model.num_layers=3 contradicts model.init_from '{d}/run', which has num_layers=2"),
    ("train", ["train", TINY, "model.init_from={d}/run", "model.num_layers=4"], 2,  # 4 is the default: still given
     "model.num_layers=4 contradicts model.init_from '{d}/run', which has num_layers=2"),
    ("train", ["train", TINY, "model.init_from={d}/run", "model.num_heads=3"], 2,  # not "not divisible by num_kv_heads"
     "model.num_heads=3 contradicts model.init_from '{d}/run', which has num_heads=4"),
    ("train", ["train", TINY, "train.lora.rank=-1"], 2, "'train.lora.rank' must be >= 0"),
    ("train", ["train", TINY, "train.lora.rnak=4"], 2, "unknown config key 'train.lora.rnak'; did you mean 'rank'?"),
    ("train", ["train", TINY, "train.lora.alpha=0"], 2, "'train.lora.alpha' must be positive"),
    ("train", ["train", TINY, "train.lora.dropout=1"], 2, "'train.lora.dropout' must be in [0, 1)"),
    ("train", ["train", TINY, "train.lora.rank=4", "train.lora.targets=[q,x]"], 2, "'train.lora.targets' has 'x'"),
    ("train", ["train", TINY, "train.lora.targets=7"], 2, "'train.lora.targets' must be a list of names"),
    ("train", ["train", TINY, "train.lora.base_dtype=float16"], 2, "'train.lora.base_dtype' is 'float16'"),
    ("train", ["train", TINY, "train.lora.rank=33", "train.lora.targets=[q,k]"], 2,
     "train.lora.rank=33 is larger than the 'k' projection allows (64 inputs, 32 outputs): an adapter's rank cannot exceed min(in, out)"),
    ("train", ["train", TINY, "train.lora.rank=100000"], 2, "set train.lora.rank=32 or less"),
    # a LoRA run (rank 8 on q, v) resumed with settings that change its adapters: refused before any restore
    ("train", ["train", TINY, "checkpoint.dir={d}/lora_run", "train.lora.rank=4"], 2,
     "'{d}/lora_run' holds a run with train.lora.rank=8, not 4; use a new checkpoint.dir, or --force to move that run aside"),
    ("train", ["train", TINY, "checkpoint.dir={d}/lora_run"], 2, "holds a run with train.lora.rank=8, not 0"),
    ("train", ["train", TINY, "checkpoint.dir={d}/lora_run", "train.lora.rank=8", "train.lora.targets=[q,k]"], 2,
     "holds a run with train.lora.targets=[q,v], not [q,k]"),
    ("train", ["train", TINY, "checkpoint.dir={d}/lora_run", "train.lora.rank=8", "train.lora.alpha=32"], 2,
     "holds a run with train.lora.alpha=16.0, not 32.0"),
    ("train", ["train", TINY, "checkpoint.dir={d}/lora_run", "train.lora.rank=8", "train.lora.base_dtype=bfloat16"], 2,
     "holds a run with train.lora.base_dtype=float32, not bfloat16"),
    # ---- generate
    ("generate", ["generate", "--prompt", "x"], 2, "the following arguments are required: --checkpoint"),
    ("generate", ["generate", "--checkpoint", "{d}/run"], 2, "the following arguments are required: --prompt"),
    ("generate", ["generate", "--checkpoint", "{d}/run", "--prompt", "x", "--max-new-tokens", "ten"], 2, "is not a whole number"),
    ("generate", ["generate", "--checkpoint", "{d}/run", "--prompt", "x", "--max-new-tokens", "0"], 2, "must be positive"),
    ("generate", ["generate", "--checkpoint", "{d}/run", "--prompt", "x", "--temperature", "hot"], 2, "invalid float value"),
    ("generate", ["generate", "--checkpoint", "{d}/run", "--prompt", "x", "--temperature", "nan"], 2, "'decode.temperature' must be a finite"),
    ("generate", ["generate", "--checkpoint", "{d}/run", "--prompt", "x", "--temperature", "-1"], 2, "'decode.temperature' must be >= 0"),
    ("generate", ["generate", "--checkpoint", "{d}/run", "--prompt", "x", "--top-p", "0"], 2, "'decode.top_p' must be in (0, 1]"),
    ("generate", ["generate", "--checkpoint", "{d}/run", "--prompt", "x", "--top-p", "1.5"], 2, "'decode.top_p' must be in (0, 1]"),
    ("generate", ["generate", "--checkpoint", "{d}/run", "--prompt", "x", "--top-k", "-1"], 2, "must be >= 0"),
    ("generate", ["generate", "--checkpoint", "{d}/run", "--prompt", "x", "--seed", "1.5"], 2, "is not a whole number"),
    ("generate", ["generate", "--checkpoint", "{d}/run", "--prompt", "x", "--step", "-3"], 2, "must be >= 0"),
    ("generate", ["generate", "--checkpoint", "{d}/missing", "--prompt", "x"], 2, "does not exist"),
    ("generate", ["generate", "--checkpoint", "{d}/run", "--prompt", "x", "--max-new-tokens", "2000000000"], 2,
     "lower --max-new-tokens"),
    ("generate", ["generate", "--checkpoint", "{d}/afile", "--prompt", "x"], 2, "is a file, not a run directory"),
    ("generate", ["generate", "--checkpoint", "{d}/empty_dir", "--prompt", "x"], 2, "no checkpoint found"),
    ("generate", ["generate", "--checkpoint", "{d}/run", "--prompt", "x", "--step", "7"], 2, "checkpoint step 7 not found"),
    ("generate", ["generate", "--checkpoint", "{d}/corrupt", "--prompt", "x", "--step", "2"], 74, "checkpoint step 2 in"),
    ("generate", ["generate", "--checkpoint", "{d}/run", "--prompt", "x", "--chat"], 2, "--chat needs the model's own tokenizer"),
    # ---- serve
    ("serve", ["serve"], 2, "the following arguments are required: checkpoint"),
    ("serve", ["serve", "{d}/run", "--port", "99999"], 2, "is not a TCP port"),
    ("serve", ["serve", "{d}/run", "--port", "http"], 2, "is not a whole number"),
    ("serve", ["serve", "{d}/run", "--num-pages", "0"], 2, "must be positive"),
    ("serve", ["serve", "{d}/run", "--page-size", "x"], 2, "is not a whole number"),
    ("serve", ["serve", "{d}/run", "--max-batch", "-1"], 2, "must be positive"),
    ("serve", ["serve", "{d}/run", "--max-context", "0"], 2, "must be positive"),
    ("serve", ["serve", "{d}/missing"], 2, "does not exist"),
    ("serve", ["serve", "{d}/run", "--step", "9"], 2, "checkpoint step 9 not found"),
    ("serve", ["serve", "{d}/run", "--num-pages", "2000000000"], 2, "lower --num-pages"),
    ("serve", ["serve", "{d}/run", "--api-key", ""], 2, "must be a non-empty printable string without spaces"),
    ("serve", ["serve", "{d}/run", "--api-key", "two words"], 2, "must be a non-empty printable string without spaces"),
    ("serve", ["serve", "{d}/run", "--host-kv-gib", "lots"], 2, "'lots' is not a number"),
    ("serve", ["serve", "{d}/run", "--host-kv-gib", "-1"], 2, "must be a finite number >= 0"),
    ("serve", ["serve", "{d}/run", "--host-kv-gib", "1e9"], 2, "lower --host-kv-gib"),
    # ---- kernels, plan (refused while parsing: before any compile)
    ("kernels", ["kernels"], 2, "the following arguments are required: config"),
    ("kernels", ["kernels", TINY, "--target", "h900"], 2, "'h900' is not a target; choose one of"),
    ("kernels", ["kernels", "{d}/missing.yaml"], 2, "does not exist"),
    ("plan", ["plan", TINY, "--target", "v100"], 2, "'v100' is not a GPU target"),
    ("plan", ["plan", TINY, "--topology", "1x100000000"], 2, "an HGX host holds at most 8"),
    ("plan", ["plan", TINY, "--topology", "8"], 2, "is not HOSTSxGPUS"),
    ("plan", ["plan", TINY, "--context", "-5"], 2, "'-5' must be positive"),
    ("plan", ["plan", TINY, "--decode-batch", "0"], 2, "'0' must be positive"),
    ("plan", ["plan", TINY, "--no-train", "--no-decode"], 2, "leave nothing to plan: drop one of them"),
    # ---- convert
    ("convert", ["convert", "{d}/run"], 2, "the following arguments are required: dst"),
    ("convert", ["convert", "{d}/run", "{d}/hf", "--dtype", "float64"], 2, "invalid choice: 'float64'"),
    ("convert", ["convert", "{d}/missing", "{d}/out"], 2, "is neither a .gguf file"),
    ("convert", ["convert", "{d}/good.txt", "{d}/out"], 2, "is neither a .gguf file"),
    ("convert", ["convert", "{d}/good.txt", "{d}/run"], 2, "is not an empty directory"),
    ("convert", ["convert", "{d}/run", "{d}/data"], 2, "data' is not an empty directory"),
    ("convert", ["convert", "{d}/run", "{d}/good.txt"], 2, "good.txt' is not an empty directory"),
    ("convert", ["convert", "{d}/truncated_hf", "{d}/out"], 65, "model.safetensors' is not a readable safetensors file"),
    ("convert", ["convert", "{d}/garbage.gguf", "{d}/out"], 65, "garbage.gguf' is not a readable GGUF file"),
    ("convert", ["convert", "{d}/run", "{d}/out", "--adapter-only"], 2, "is not a LoRA run"),
    ("convert", ["convert", "{d}/good.txt", "{d}/out", "--adapter-only"], 2, "is not a jaxlm run directory"),
    # ---- prepare-data
    ("prepare-data", ["prepare-data", "{d}/good.txt"], 2, "the following arguments are required: --out"),
    ("prepare-data", ["prepare-data", "--out", "{d}/p"], 2, "the following arguments are required: inputs"),
    ("prepare-data", ["prepare-data", "{d}/good.txt", "--out", "{d}/p", "--encoding-errors", "skip"], 2, "invalid choice: 'skip'"),
    ("prepare-data", ["prepare-data", "{d}/latin1.txt", "--out", "{d}/p"], 65, "latin1.txt' is not UTF-8 text: byte 3 is 0xe9; "),
    ("prepare-data", ["prepare-data", "{d}/binary.jsonl", "--out", "{d}/p"], 65, "binary.jsonl' line 2 is not UTF-8 text: byte 15 is 0x80"),
    ("prepare-data", ["prepare-data", "{d}/notobj.jsonl", "--out", "{d}/p"], 65, "notobj.jsonl:2 is not a JSON object"),
    ("prepare-data", ["prepare-data", "{d}/good.txt", "--out", "{d}/p", "--text-field", "body"], 0, None),
    ("prepare-data", ["prepare-data", "{d}/table.csv", "--out", "{d}/p"], 2, "is neither .txt"),
    ("prepare-data", ["prepare-data", "{d}/missing.txt", "--out", "{d}/p"], 2, "does not exist"),
    ("prepare-data", ["prepare-data", "{d}/empty_dir", "--out", "{d}/p"], 2, "input '{d}/empty_dir' is a directory, not a file"),
    ("prepare-data", ["prepare-data", "{d}/empty.txt", "--out", "{d}/p"], 2, "the inputs hold no text"),
    ("prepare-data", ["prepare-data", "{d}/good.txt", "--out", "{d}/data"], 2, "already exists"),
    ("prepare-data", ["prepare-data", "{d}/good.txt", "--out", "{d}/afile/p"], 2, "is a file, not a directory"),
    ("prepare-data", ["prepare-data", "{d}/good.txt", "--out", "{d}/p", "--tokenizer", "{d}/not_tokenizer.json"], 2, "is not a Hugging Face tokenizer.json"),
    ("prepare-data", ["prepare-data", "{d}/good.txt", "--out", "{d}/p", "--tokenizer", "{d}/missing.json"], 2, "does not exist"),
    ("prepare-data", ["prepare-data", "--chat", "{d}/chat_role.jsonl", "--out", "{d}/p"], 2, "--chat needs --tokenizer"),
    ("prepare-data", ["prepare-data", "--chat", "{d}/chat_role.jsonl", "--out", "{d}/p", "--tokenizer", "{d}/not_tokenizer.json"], 2, "is not a Hugging Face tokenizer.json"),
    ("prepare-data", ["prepare-data", "--chat", "{d}/good.txt", "--out", "{d}/p", "--tokenizer", "{d}/chat_tok/tokenizer.json"], 2, "is not .jsonl; --chat reads JSONL"),
    ("prepare-data", ["prepare-data", "--chat", "{d}/chat_role.jsonl", "--out", "{d}/p", "--tokenizer", "{d}/chat_tok/tokenizer.json", "--seq-len", "0"], 2, "'0' must be positive"),
    ("prepare-data", ["prepare-data", "--chat", "{d}/chat_badjson.jsonl", "--out", "{d}/p", "--tokenizer", "{d}/chat_tok/tokenizer.json"], 65, "chat_badjson.jsonl:2 is not valid JSON"),
    ("prepare-data", ["prepare-data", "--chat", "{d}/chat_role.jsonl", "--out", "{d}/p", "--tokenizer", "{d}/chat_tok/tokenizer.json"], 65, "chat_role.jsonl:2: message 0 has role 'narrator'; roles are system, user, assistant"),
    ("prepare-data", ["prepare-data", "--chat", "{d}/chat_empty.jsonl", "--out", "{d}/p", "--tokenizer", "{d}/chat_tok/tokenizer.json"], 65, "chat_empty.jsonl:3: 'messages' is empty"),
    ("prepare-data", ["prepare-data", "--chat", "{d}/chat_noanswer.jsonl", "--out", "{d}/p", "--tokenizer", "{d}/chat_tok/tokenizer.json"], 65, "chat_noanswer.jsonl:1: message 1 (assistant) has content of type int"),
    ("prepare-data", ["prepare-data", "--chat", "{d}/chat_ok.jsonl", "--out", "{d}/p", "--tokenizer", "{d}/chat_tok/tokenizer.json"], 0, None),
    ("prepare-data", ["prepare-data", "--chat", "{d}/chat_both.jsonl", "--out", "{d}/p", "--tokenizer",
                      "{d}/chat_tok/tokenizer.json"], 65, "chat_both.jsonl:2: the row has both 'messages' and 'prompt'/'completion'"),
    ("prepare-data", ["prepare-data", "--chat", "{d}/chat_nocontent.jsonl", "--out", "{d}/p", "--tokenizer",
                      "{d}/chat_tok/tokenizer.json"], 65, "chat_nocontent.jsonl:1: message 0 (user) has no 'content'"),
    ("prepare-data", ["prepare-data", "--chat", "{d}/chat_ok.jsonl", "--out", "{d}/p", "--tokenizer",
                      "{d}/chat_tok/tokenizer.json", "--seq-len", "4"], 65, "no assistant token is left in the 2 conversations (2 cut"),
]
# prepare-data with --text-field on a .txt input is not bad input: it is here to show the table
# tells the two apart (exit 0, nothing on stderr), and its output is removed again below.


def _expand(argv, d):
    return [a.replace("{d}", str(d)) for a in argv]


def test_the_table_covers_every_subcommand_with_enough_inputs():
    from jaxlm.cli import build_parser

    commands = set(build_parser()._subparsers._group_actions[0].choices)
    counts = {c: sum(1 for row in TABLE if row[0] == c and row[2] != 0) for c in commands | {"-"}}
    assert all(counts[c] >= 1 for c in commands), counts
    assert sum(counts.values()) >= 60, counts


@pytest.mark.parametrize("command, argv, code, fragment", TABLE, ids=lambda v: None)
def test_bad_input_gives_one_line_and_changes_nothing(world, capsys, command, argv, code, fragment):
    d, _ = world
    before = file_hashes(d)
    rc = main(_expand(argv, d))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    if code == 0:
        assert rc == 0 and err == "", err
        import shutil

        shutil.rmtree(d / "p")
        assert file_hashes(d) == before
        return
    lines = err.splitlines()
    assert rc == code, err
    assert len(lines) == 1 and lines[0].startswith("jaxlm: error: "), err
    assert not lines[0].startswith("jaxlm: error: jaxlm:"), lines[0]
    assert _expand([fragment], d)[0] in lines[0], lines[0]
    assert file_hashes(d) == before  # no file of a previous run (or any input) changed
    assert not (d / "p").exists() and not list(d.glob(".p.tmp-*"))  # nothing half-written left behind


def test_read_only_checkpoint_dir_and_output_dir(world, capsys):
    d, locked = world
    if not locked:
        pytest.skip("cannot make a directory read-only for this user on this file system")
    before = file_hashes(d)
    rc = main(["train", TINY, f"checkpoint.dir={d / 'locked'}"])
    err = capsys.readouterr().err
    assert rc == 74 and len(err.splitlines()) == 1 and "cannot write to checkpoint directory" in err, err
    rc = main(["prepare-data", str(d / "good.txt"), "--out", str(d / "locked" / "p")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.splitlines()) == 1 and "cannot create --out" in err, err
    assert file_hashes(d) == before


def test_generate_on_a_corrupt_latest_checkpoint_falls_back_and_says_so(world, capsys):
    d, _ = world
    before = file_hashes(d)
    rc = main(["generate", "--checkpoint", str(d / "corrupt"), "--prompt", "ROMEO:", "--max-new-tokens", "3",
               "--temperature", "0"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert len(err.splitlines()) == 1 and err.startswith("warning: checkpoint step 2 ") and "using step 1" in err, err
    assert "--- prompt: 'ROMEO:'" in out
    assert file_hashes(d) == before  # the corrupt step is reported, not renamed: generate writes nothing


def test_encoding_errors_replace_reads_what_strict_refuses(world, tmp_path, capsys):
    d, _ = world
    rc = main(["prepare-data", str(d / "latin1.txt"), "--out", str(tmp_path / "p"), "--encoding-errors", "replace"])
    assert rc == 0, capsys.readouterr().err
    tokens = (tmp_path / "p" / "tokens.bin").read_bytes()
    want = jaxlm.load_tokenizer().encode("caf\ufffd au lait\n").ids
    import numpy as np

    np.testing.assert_array_equal(np.frombuffer(tokens, np.uint16)[:-1], want)


def _jaxlm(*args, env=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=REPO) if env is None else env
    return subprocess.run([sys.executable, "-m", "jaxlm.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("argv, code", [
    (["train", TINY, "train.learning_rate=.nan"], 2),
    ([], 2),
    (["prepare-data", "{d}/latin1.txt", "--out", "{d}/p"], 65),
    (["generate", "--checkpoint", "{d}/corrupt", "--prompt", "x", "--step", "2"], 74),
    (["train", TINY, "checkpoint.dir={d}/lora_run", "train.lora.rank=4"], 2),  # was exit 74 and Orbax's traceback
])
def test_as_real_processes(world, argv, code):
    d, _ = world
    before = file_hashes(d)
    r = _jaxlm(*_expand(argv, d))
    assert r.returncode == code, r.stderr
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("jaxlm: error: "), r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    assert file_hashes(d) == before


def test_orphaned_orbax_futures_of_a_failed_save_are_not_logged_but_others_are(caplog):
    """A failed save leaves asyncio tasks and gathering futures whose error nobody retrieves; asyncio logs
    each one ("Task ...", "_GatheringFuture exception was never retrieved") when it is collected. Those
    raised in orbax are dropped; the same from any other code still reaches the log."""
    import asyncio
    import gc
    import logging

    from jaxlm.cli import _one_line_errors_only

    _one_line_errors_only()
    fake_orbax = {}
    exec(compile("async def write():\n    raise ValueError('Failed to write: File too large')\n",
                 os.sep + os.path.join("site-packages", "orbax", "serialization.py"), "exec"), fake_orbax)

    async def ours():
        raise ValueError("a bug of ours")

    async def leave_unretrieved():
        for write in (fake_orbax["write"], ours):
            asyncio.gather(write(), write())
            asyncio.ensure_future(write())
        # tensorstore sets its read or write error on a future from native code: no Python frame
        asyncio.get_running_loop().create_future().set_exception(ValueError("OUT_OF_RANGE: Error writing (native)"))
        await asyncio.sleep(0.01)

    gc.collect()  # what earlier tests of this process left behind is not this test's
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        asyncio.run(leave_unretrieved())
        gc.collect()
    logged = [r for r in caplog.records if "exception was never retrieved" in r.getMessage()
              and any(words in str(r.exc_info[1]) for words in ("a bug of ours", "File too large", "(native)"))]
    kinds = sorted(r.getMessage().split()[0] for r in logged)
    assert kinds == ["Task", "_GatheringFuture"], [r.getMessage() for r in logged]
    assert all("a bug of ours" in str(r.exc_info[1]) for r in logged)


@pytest.mark.slow
def test_disk_full_during_a_save_keeps_the_earlier_checkpoints(tmp_path):
    """``prlimit --fsize`` caps the size of any file the process writes (EFBIG, as a full disk
    gives ENOSPC): the first save fails; the run stops with one line and the earlier steps stay."""
    run = tmp_path / "run"
    common = ["train", TINY, "train.warmup_steps=1", "train.progress=false", "train.eval_batches=1",
              "train.eval_every=100", f"checkpoint.dir={run}", "checkpoint.save_every=2", "mesh.fsdp=1",
              "mesh.data=1"]
    env_1 = {"XLA_FLAGS": xla_flags(1)}
    first = _jaxlm(*common, "train.steps=2", env=dict(os.environ, PYTHONPATH=REPO, **env_1))
    assert first.returncode == 0, first.stderr
    before = file_hashes(run)
    # (no persistent compilation cache: its writes would hit the same limit)
    r = subprocess.run(["prlimit", "--fsize=300000", sys.executable, "-m", "jaxlm.cli", *common, "train.steps=4"],
                       cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO, JAX_ENABLE_COMPILATION_CACHE="false", **env_1),
                       capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 74, r.stderr[-3000:]
    assert len(r.stderr.splitlines()) == 1, r.stderr[-3000:]
    assert "could not write checkpoint step 4" in r.stderr and "File too large" in r.stderr
    assert "kept checkpoints: steps 2 (" in r.stderr
    after = file_hashes(run)
    assert {k: v for k, v in after.items() if k.startswith("2/")} == {k: v for k, v in before.items() if k.startswith("2/")}
    ckpt = Checkpointer(run, create=False)
    assert ckpt.all_steps() == [2]
    ckpt.close()


def test_a_port_in_use_is_a_serve_error():
    import socket

    from jaxlm.errors import ServeError
    from jaxlm.serve.server import serve

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ServeError, match=f"cannot listen on 127.0.0.1:{port} .*choose another --port"):
            serve(object(), "127.0.0.1", port)  # refused before the engine is touched


@pytest.mark.slow
def test_force_sets_a_lora_run_with_another_rank_aside_without_a_traceback(world, tmp_path):
    """--force with another train.lora.rank moves the old run aside untouched (no restore is tried, so
    Orbax prints nothing) and trains afresh."""
    d, _ = world
    run = tmp_path / "lora_run"
    subprocess.run(["cp", "-r", str(d / "lora_run"), str(run)], check=True)
    before = file_hashes(run)
    r = _jaxlm("train", TINY, f"checkpoint.dir={run}", "train.lora.rank=4", "train.steps=1", "train.warmup_steps=0",
               "train.eval_batches=1", "train.progress=false", "--force")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stdout + r.stderr and "Exception ignored" not in r.stderr, r.stderr
    aside = [p for p in run.iterdir() if p.name.startswith("superseded-")]
    assert len(aside) == 1 and "had train.lora.rank=8; moved its checkpoints to" in r.stdout, r.stdout
    assert file_hashes(aside[0]) == before  # the old run, byte for byte
    ckpt = Checkpointer(run, create=False)
    assert ckpt.read_config(1).train.lora.rank == 4
    ckpt.close()
