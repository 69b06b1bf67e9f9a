"""Reading and writing, one job per module: ``checkpoint`` (the rewritten checkpoint format, ``rewrite.save`` /
``rewrite.load``), ``sources`` (what the CLI opens: a folder, a ``.pt2``, a factory), ``models`` (building a
model from a folder's config or a factory), ``weights`` (weights files, checked), ``inputs`` (example batches,
calibration files), ``export`` (``torch.export`` artifacts), ``files`` (JSON, paths, writing safely).

Example::

    model = rewrite.optimize(model, "exact", example_kwargs=batch)
    rewrite.io.save(model, "minilm-rewritten", tokenizer=tokenizer)
    again = rewrite.io.load("minilm-rewritten")
"""
from .checkpoint import EXAMPLE_FILE, META_FILE, PLAN_FILE, STATE_FILE, load, read_plan, save
from .export import export_model, program_bytes, reexport, rewrite_program, save_program, split_example
from .files import atomic_path, check_output, check_space, model_bytes, same_or_inside
from .inputs import CALIBRATION_HELP, example_kwargs, read_calibration
from .models import TOKENIZER_FILES, build_factory
from .sources import Source, load_program, open_source
from .weights import check_weights, read_state_dict

__all__ = ["save", "load", "read_plan", "open_source", "load_program", "Source", "read_calibration", "example_kwargs",
           "export_model", "rewrite_program", "reexport", "program_bytes", "save_program", "split_example",
           "atomic_path", "check_output", "check_space", "model_bytes", "same_or_inside", "check_weights",
           "read_state_dict", "build_factory", "PLAN_FILE", "META_FILE", "EXAMPLE_FILE", "STATE_FILE",
           "TOKENIZER_FILES", "CALIBRATION_HELP"]
