"""Write the FusionINN phantom sample shipped with the Slicer module (FusionINN/Resources/SampleData).

The Sample Data module copies these files (``file://`` URIs) into its cache and loads them, so the
sample needs neither torch nor the network, and ``SampleData.downloadSample("FusionINNPhantom")``
works on every Slicer version (its ``downloadFromSource`` ignores a custom downloader). The volumes
are ``make_phantom_case((64, 128, 128), seed=0)`` at 1 mm, intensities rounded to int16 (gzip NRRD).

    python scripts/make_sample_data.py
"""
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from FusionINNLib.io.atomic import atomic_file
from FusionINNLib.io.phantom import make_phantom_case

OUT = Path(__file__).resolve().parents[1] / "FusionINN" / "Resources" / "SampleData"


def main() -> None:
    case = make_phantom_case((64, 128, 128), seed=0)
    OUT.mkdir(parents=True, exist_ok=True)
    for key, label, dtype in (("t1ce", "T1ce", np.int16), ("flair", "FLAIR", np.int16), ("seg", "seg", np.uint8)):
        image = sitk.GetImageFromArray(np.round(case[key]).astype(dtype))
        image.SetSpacing((1.0, 1.0, 1.0))
        path = OUT / f"FusionINNPhantom_{label}.nrrd"
        with atomic_file(path) as temp:
            sitk.WriteImage(image, str(temp), True)
        print(path, path.stat().st_size)


if __name__ == "__main__":
    main()
