"""Multi-stage pipelines: ``dinov3geo run pipelines/NAME.yaml`` (see :mod:`dinov3geo.pipelines.runner`).

Each stage is a thin call of the Python API registered in :mod:`dinov3geo.pipelines.stages`; stages whose
outputs are up to date are skipped, so re-running a pipeline is cheap.
"""

from dinov3geo.pipelines.runner import (
    Pipeline,
    StageFailed,
    StageRun,
    StageSpec,
    check_pipeline,
    fingerprint,
    load_pipeline,
    read_manifest,
    run_pipeline,
)
from dinov3geo.pipelines.stages import (
    PipelineError,
    StageContext,
    StageKind,
    get_stage,
    list_stages,
    register_stage,
)

__all__ = [
    "Pipeline",
    "PipelineError",
    "StageContext",
    "StageFailed",
    "StageKind",
    "StageRun",
    "StageSpec",
    "check_pipeline",
    "fingerprint",
    "get_stage",
    "list_stages",
    "load_pipeline",
    "read_manifest",
    "register_stage",
    "run_pipeline",
]
