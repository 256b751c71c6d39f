from tests.objectives.common import pretrained_run  # noqa: F401  (fixture)
