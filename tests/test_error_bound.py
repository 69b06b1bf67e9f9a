"""The error bound of measured policies: per calibration example (batches sliced), mean plus two deviations."""
import torch
from transformers.modeling_outputs import BaseModelOutput

from rewrite.calibrate import cosine_error, error_bound, example_errors


def test_the_bound_is_the_mean_plus_two_deviations_of_single_examples():
    assert error_bound([0.01]) == 0.01
    errors = [0.002, 0.004, 0.006, 0.008]
    sd = (sum((e - 0.005) ** 2 for e in errors) / 3) ** 0.5
    assert abs(error_bound(errors) - (0.005 + 2 * sd)) < 1e-12
    # two batches whose means agree hide examples that do not: the bound sees the examples
    assert error_bound([0.0, 0.02, 0.0, 0.02]) > 0.02 > error_bound([0.01, 0.01])


def test_example_errors_slice_outputs_and_inputs_along_the_batch():
    torch.manual_seed(0)
    ref = BaseModelOutput(last_hidden_state=torch.randn(3, 5, 4), hidden_states=(torch.randn(3, 5, 4),))
    new = BaseModelOutput(last_hidden_state=ref.last_hidden_state.clone(), hidden_states=ref.hidden_states)
    new.last_hidden_state[1] += torch.randn(5, 4)
    batch = {"input_ids": torch.zeros(3, 5, dtype=torch.long), "attention_mask": torch.ones(3, 5)}
    seen = []

    def metric(r, n, b):
        seen.append((type(r), b["input_ids"].shape, r.hidden_states[0].shape))
        return cosine_error(r, n)

    errs = example_errors(metric, ref, new, batch)
    assert len(errs) == 3 and max(errs[0], errs[2]) < 1e-6 < errs[1]
    assert abs(sum(errs) / 3 - cosine_error(ref, new)) < 1e-6     # the mean over examples is the batch metric
    assert all(s == (BaseModelOutput, (1, 5), (1, 5, 4)) for s in seen)


def test_a_batch_that_cannot_be_sliced_gives_one_error():
    out = torch.ones(2, 3)
    assert example_errors(lambda r, n, b: 0.5, out, out, {"text": "no tensors"}) == [0.5]

    def refuses_slices(r, n, b):
        if b.shape[0] != 2:
            raise ValueError("this metric compares whole batches")
        return 0.25
    assert example_errors(refuses_slices, out, out, torch.zeros(2, 3)) == [0.25]
