"""Configuration: the schema (`schema.py`, the defaults file), an experiment's loading and
validation (`load.py`), a trial's identity (`identity.py`) and the evaluation backend
(`backend.py`); `ConfigError` lives in the leaf `raysweep/errors.py`. Inside the package, modules
import from those files; this module gathers their public names for scripts and notebooks."""

from ..errors import ConfigError  # noqa: F401
from .backend import (  # noqa: F401
    BACKENDS,
    resolve_backend,
    vllm_available,
)
from .identity import (  # noqa: F401
    EVAL_RUN_ONLY,
    adapter_digest,
    file_digest,
    files_digest,
    start_key,
    trial_fields,
    trial_id,
    vector_key,
)
from .load import (  # noqa: F401
    CHOICES,
    CONDITIONS,
    REPO_ROOT,
    available_experiments,
    check_logging,
    experiments_dir,
    load_config,
    parse_exp_args,
    stage_main,
    validate,
    validate_trial,
)
from .schema import (  # noqa: F401
    DataConfig,
    DatagenConfig,
    DefenseConfig,
    EvalConfig,
    ExperimentConfig,
    GradConfig,
    IPConfig,
    LogConfig,
    LoraConfig,
    ModelConfig,
    RUN_ONLY_FIELDS,
    StartConfig,
    SteerConfig,
    SweepConfig,
    TrainConfig,
    TraitJudgeConfig,
    apply_overrides,
    from_dict,
    get_path,
    to_yaml,
)
