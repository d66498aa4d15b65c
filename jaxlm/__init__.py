"""jaxlm: train and serve Llama-family language models sharded over device meshes.

    import jaxlm
    cfg = jaxlm.load_config("configs/tiny.yaml")
    model = jaxlm.build_model(cfg.model)
    model = jaxlm.train(cfg, model).model
    print(jaxlm.generate(model, ["ROMEO:"], cfg.decode)[0])
"""

from jaxlm.build import build_model
from jaxlm.checkpoint import restore
from jaxlm.config import Config, ConfigError, load_config
from jaxlm.data import load_tokenizer
from jaxlm.errors import (
    CheckpointError, DataError, DistributedError, InteropError, JaxlmError, ServeError,
)
from jaxlm.generate import generate, generate_tokens
from jaxlm.model import Transformer
from jaxlm import hooks, interop
from jaxlm.train import TrainResult, train
from sharding.mesh import make_mesh

__all__ = [
    "CheckpointError", "Config", "ConfigError", "DataError", "DistributedError", "InteropError", "JaxlmError",
    "ServeError", "Transformer", "TrainResult", "build_model", "generate", "generate_tokens",
    "hooks", "interop", "load_config", "load_tokenizer", "make_mesh", "restore", "train",
]
