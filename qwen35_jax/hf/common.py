"""What every part of the Hugging Face bridge shares: its error type and dtype spellings."""

from __future__ import annotations

import ml_dtypes
import numpy as np

NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float64": np.float64}


class CheckpointError(ValueError):
    """A checkpoint that does not match its config, or a config the model cannot honour: names the tensor or key."""


def dtype_name(dtype) -> str:
    """'float32' | 'bfloat16' | 'float16' | 'float64' from a name, a numpy/ml_dtypes dtype or a JAX dtype."""
    if isinstance(dtype, str):
        name = dtype
    else:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            raise CheckpointError(f"dtype {dtype!r} is not a float dtype") from None
    if name not in NP_DTYPES:
        raise CheckpointError(f"dtype {dtype!r} is not one of {sorted(NP_DTYPES)}")
    return name


def np_dtype(dtype):
    return NP_DTYPES[dtype_name(dtype)]
