"""Shared fixtures: one local Ray instance for the whole session, sized for a 2-core machine, and
the tiny model's tokenizer."""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Set before Ray starts so every Ray worker process inherits them.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def raypo_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A session-wide RAYPO_CACHE_DIR so the tiny model is built once, outside ~/.cache."""
    path = str(tmp_path_factory.mktemp("raypo-cache"))
    os.environ["RAYPO_CACHE_DIR"] = path
    return path


@pytest.fixture(scope="session")
def tokenizer(raypo_cache: str) -> PreTrainedTokenizerBase:
    """The tiny model's tokenizer (``load_tokenizer("tiny")``), shared: a test that changes it
    changes a copy."""
    from raypo.models import load_tokenizer

    return load_tokenizer("tiny")


@pytest.fixture(scope="session")
def with_bos(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """The tiny tokenizer adding BOS to plain text (as Llama's does); its template writes BOS."""
    from tokenizers import processors

    result = copy.deepcopy(tokenizer)
    bos = result.bos_token
    result.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, result.bos_token_id)]
    )
    return result


@pytest.fixture(scope="session")
def ray_session(raypo_cache: str) -> Iterator[None]:
    """A local Ray with 4 logical CPUs: Ray Data tasks and Ray Train workers use fractional
    CPUs, and the extra logical CPUs keep them from starving each other on 2 real cores. The
    dashboard serves the State API that Ray Train's placement-group cleaner needs (see
    raypo.ray_runtime.init_ray)."""
    import ray

    from raypo.ray_runtime import disable_data_progress_bars

    ray.init(num_cpus=4, include_dashboard=True, configure_logging=False)
    disable_data_progress_bars()
    yield
    ray.shutdown()
