"""smar.errors: one error type for the library, the commands and the testbed, said in one line
(``problem; fix: ...``), each kind pickling across worker processes; ``smar.testbed.errors``
re-exports the same classes (how the commands print them: tests/test_cli_errors.py)."""

import pickle

import pytest

import smar.errors as errors
import smar.testbed.errors as testbed_errors


def test_the_message_is_the_problem_and_the_fix_in_one_line():
    assert str(errors.SmarError("bad thing")) == "bad thing"
    assert str(errors.SmarError("bad thing", "do this")) == "bad thing; fix: do this"
    e = errors.CorruptFile("/x/model.safetensors", "checksum differs", "delete it")
    assert str(e) == "/x/model.safetensors is corrupt (checksum differs); fix: delete it"


@pytest.mark.parametrize(
    "error",
    [
        errors.UsageError("p", "f"),
        errors.AnalyzeError("p"),
        errors.CorruptFile("a.json", "not JSON"),
        errors.Diverged("loss is nan", "lower the learning rate"),
        errors.Interrupted("stopped", "run it again"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_every_kind_is_a_smar_error_and_pickles(error):
    assert isinstance(error, errors.SmarError)
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error) and str(back) == str(error)


def test_usage_errors_are_value_errors_and_exit_codes_are_set():
    assert issubclass(errors.UsageError, ValueError)
    assert issubclass(errors.AnalyzeError, errors.UsageError)
    assert errors.SmarError.exit_code == errors.Diverged.exit_code == 2
    assert errors.Interrupted.exit_code == 130


def test_the_testbed_module_re_exports_the_same_classes():
    for name in testbed_errors.__all__:
        assert getattr(testbed_errors, name) is getattr(errors, name)


def test_the_library_s_checks_of_its_arguments_raise_usage_errors():
    """A bad argument to the library is a `smar.UsageError` (still a `ValueError`), said in one
    line: the same kind the commands print without a traceback."""
    import torch

    import smar

    with pytest.raises(smar.UsageError, match="band"):
        smar.SMARConfig(band=(2.0, 1.0))
    logits = [torch.randn(4, 3), torch.randn(5, 3)]
    with pytest.raises(smar.UsageError, match="every layer must route the same tokens"):
        smar.smar_loss(logits, torch.tensor([0, 1, 0, 1]))
    assert smar.SmarError is errors.SmarError and smar.UsageError is errors.UsageError
