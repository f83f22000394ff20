"""The dataset card the job writes as OUTPUT/README.md, so that the output loads as a dataset as it is.

    datasets.load_dataset(OUTPUT)             -> the images config: PNG columns decoded as PIL images
    datasets.load_dataset(OUTPUT, "errors")   -> one row per input that failed (when any did)

The YAML header declares the two configs (`images`, the default, and `errors`) and their features,
with every `*_png` column as an image; the body says what the columns are, how the output was made
(counts, model, schema version) and what it does not promise.
"""

from __future__ import annotations

import pyarrow as pa

from pipeline.schema import ERRORS_SCHEMA, SCHEMA_VERSION, images_schema

_DTYPES = {  # Arrow type -> Hugging Face datasets dtype
    pa.string(): "string", pa.binary(): "binary", pa.int32(): "int32", pa.int64(): "int64",
    pa.float32(): "float32", pa.float64(): "float64", pa.bool_(): "bool",
}


def _feature(field: pa.Field) -> list[str]:
    """The YAML lines of one feature."""
    if field.name.endswith("_png"):
        return [f"  - name: {field.name}", "    dtype: image"]
    if pa.types.is_list(field.type):
        return [f"  - name: {field.name}", f"    list: {_DTYPES[field.type.value_type]}"]
    return [f"  - name: {field.name}", f"    dtype: {_DTYPES[field.type]}"]


def _features(name: str, schema: pa.Schema) -> list[str]:
    return [f"- config_name: {name}", "  features:", *(line for f in schema for line in _feature(f))]


def dataset_card(variants: tuple[str, ...], manifest: dict) -> str:
    """The README.md of an output folder: the YAML configs and features, then a short description."""
    counts, model = manifest["counts"], manifest["model"]
    flags = ", ".join(f"{n} {flag}" for flag, n in counts.get("qc_flags", {}).items()) or "none"
    with_errors = counts["errors"] > 0  # datasets cannot load a config with no rows: declared only when there are some
    header = [
        "---",
        "configs:",
        "- config_name: images",
        '  data_files: "images/*.parquet"',
        "  default: true",
        *(["- config_name: errors", '  data_files: "errors/*.parquet"'] if with_errors else []),
        "dataset_info:",
        *_features("images", images_schema(variants)),
        *(_features("errors", ERRORS_SCHEMA) if with_errors else []),
        "---",
    ]
    body = f"""
# Lung-focused chest X-rays

Written by xray-lung-prep {manifest.get("version", "?")} (output schema version {SCHEMA_VERSION}); the run's
options, counts and contract are in `manifest.json`.

- `images/`: {counts["ok"]} images, one row each: the lung mask (`mask_png`, 0/255 at the source's
  size), the variants {", ".join(f"`{v}_png`" for v in variants) or "(none)"} (8- or 16-bit gray PNG),
  their sizes, the lung bounding box and fraction (and each lung's: `right_lung_fraction`,
  `left_lung_fraction`), `quality_score` (the mask's predicted Dice), QC flags and `qc_pass`
  ({counts.get("qc_failed", 0)} rows fail QC; flags: {flags}), decoding notes, the allowlisted DICOM
  attributes and keyed pseudonyms.
- `errors/`: {counts["errors"]} inputs that could not be used, with the stage and a one-line reason
  (the `errors` config exists when there is at least one).
- Masks by the model `{model["name"]}` (sha256 `{model["sha256"][:16]}...`).

```python
import datasets
images = datasets.load_dataset("path/to/this/folder", split="train")   # PNG columns as PIL images
errors = datasets.load_dataset("path/to/this/folder", "errors", split="train")
```

Text burned into the pixels is not removed: rows flagged `burned_in_annotation` (and images whose
header did not say so) may show names or dates. `source_path` is relative to the input root,
absolute, or a keyed hash, as the run chose.
"""
    return "\n".join(header) + "\n" + body
