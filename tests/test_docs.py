"""Every public function of the library, and of the trainer's data and metrics modules,
documents itself with a runnable example (run by pytest's doctest collection of
childtuning_jax/ and train/, see pyproject.toml)."""

import inspect

import pytest

import childtuning_jax
from childtuning_jax import regularizers

models = pytest.importorskip("childtuning_jax.models")


def _public_functions(module):
  names = getattr(module, "__all__", [n for n in dir(module) if not n.startswith("_")])
  for name in names:
    value = getattr(module, name)
    package = module.__name__.split(".")[0]  # childtuning_jax or train: not what they import
    if inspect.isfunction(value) and value.__module__.startswith(package):
      yield f"{module.__name__}.{name}", value


text_datasets = pytest.importorskip("train.text_datasets")
metrics = pytest.importorskip("train.metrics")


@pytest.mark.parametrize("module", [childtuning_jax, regularizers, models, text_datasets, metrics],
                         ids=lambda m: m.__name__)
def test_public_functions_have_runnable_examples(module):
  functions = dict(_public_functions(module))
  assert functions
  missing = [name for name, function in functions.items() if ">>>" not in (function.__doc__ or "")]
  assert not missing, f"no example in the docstring of {missing}"


def test_the_model_class_has_an_example():
  assert ">>>" in models.EncoderForSequenceClassification.__doc__
