"""Every option of every dataclass-configured command has its help, read by jsonargparse from the
`Args:` section of the config's docstring (or of a base config's): a field added without one fails."""
from __future__ import annotations

import pytest

from data_prep.download import DownloadConfig
from data_prep.folder import IngestConfig
from eval.anonymize import AnonymizeConfig
from eval.evaluate import EvaluateConfig
from eval.identity import IdentityConfig
from eval.plots import PlotConfig
from eval.wider import WiderEvalConfig
from eval.wider_job import WiderJobConfig
from fdf_builder.build import BuildConfig
from fdf_core.cli_util import dataclass_parser
from fdf_pipeline.pipeline import PipelineConfig
from slurm.executor import ClusterProfile

CONFIGS = [DownloadConfig, IngestConfig, BuildConfig, AnonymizeConfig, EvaluateConfig, IdentityConfig, PlotConfig,
           WiderEvalConfig, WiderJobConfig, PipelineConfig, ClusterProfile]
OWN = {"help", "config", "print_config"}  # the parser's own options


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_option_has_help_from_the_docstring(cls):
    positional = ("input", "output") if cls is AnonymizeConfig else ()
    parser = dataclass_parser(cls, positional=positional)
    helps = {a.dest: a.help for a in parser._actions if a.dest not in OWN}
    assert helps and not [name for name, text in helps.items() if not text], cls


def test_a_job_documents_a_shared_field_its_own_way():
    """A config's own `Args:` entry wins over its base's (the face-models options)."""
    wider = {a.dest: a.help for a in dataclass_parser(WiderJobConfig)._actions}
    build = {a.dest: a.help for a in dataclass_parser(BuildConfig)._actions}
    assert wider["confidence"].startswith("score threshold of the detector that is scored")
    assert build["confidence"].startswith("detector score threshold (FDF: 0.3)")
