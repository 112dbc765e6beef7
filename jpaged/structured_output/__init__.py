"""Constrained decoding: JSON schema, regex, choice and grammar constraints (llguidance).

params.py: StructuredOutputsParams (the request's constraint); compiler.py: compiles each
constraint once into a cached matcher; manager.py: per-request matchers and the step's token
bitmask, which jpaged.sampler applies on device.
"""

from jpaged.structured_output.manager import StructuredOutputManager, bitmask_width
from jpaged.structured_output.params import StructuredOutputsParams

__all__ = ["StructuredOutputManager", "StructuredOutputsParams", "bitmask_width"]
