"""MR Image Storage datasets for the phantom: file meta, patient/study/series/equipment, image plane,
image pixel and MR image modules, with synthetic, obviously fake identities.

Two styles (``PhantomStyle``): the project's own tidy encoding (default), and the encoding of the
RSNA 2024 Kaggle files (``kaggle_dataset``), quirks included."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels.encoders import RLELosslessEncoder
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    RLELossless,
    generate_uid,
)

from inference import __version__
from inference.geometry import ImagePlane, direction_letters
from phantom.acquisition import SeriesSpec


class PhantomStyle(StrEnum):
    """How the phantom's files are encoded."""

    DEFAULT = "default"  # MR Image Storage, Explicit VR Little Endian, every module complete
    KAGGLE = "kaggle"  # as the RSNA 2024 Kaggle files are encoded (see kaggle_dataset)


@dataclass(frozen=True)
class StudyInfo:
    """Study-level identity shared by every series of a phantom study."""

    study_id: int
    seed: int
    study_uid: str
    frame_of_reference_uid: str
    patient_name: str
    patient_id: str
    birth_date: str
    sex: str
    study_date: str
    study_time: str
    accession: str


def study_info(study_id: int, seed: int, rng: np.random.Generator) -> StudyInfo:
    """Identity of a phantom study: real UIDs (deterministic for the seed), fake patient."""
    entropy = [str(seed), str(study_id)]
    year = int(rng.integers(1940, 2000))
    date = f"2026{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"
    return StudyInfo(
        study_id=study_id,
        seed=seed,
        study_uid=generate_uid(entropy_srcs=[*entropy, "study"]),
        frame_of_reference_uid=generate_uid(entropy_srcs=[*entropy, "frame"]),
        patient_name=f"PHANTOM^LUMBAR^{study_id}",
        patient_id=f"PHANTOM-{study_id}",
        birth_date=f"{year}0101",
        sex=str(rng.choice(["F", "M"])),
        study_date=date,
        study_time=f"{int(rng.integers(7, 19)):02d}{int(rng.integers(0, 60)):02d}00",
        accession=f"PH{study_id % 10**10:010d}",
    )


def _ds(value: float) -> str:
    """A Decimal String value that always fits 16 characters."""
    text = f"{value:.6g}"
    return text if len(text) <= 16 else f"{value:.4e}"


def mr_dataset(study: StudyInfo, spec: SeriesSpec, slice_index: int, pixels: NDArray[np.uint16]) -> Dataset:
    """One MR Image Storage instance (Explicit VR Little Endian) for a slice of a series."""
    plane: ImagePlane = spec.planes[slice_index]
    instance = spec.instance_numbers[slice_index]
    sop_uid = generate_uid(entropy_srcs=[str(study.seed), str(spec.series_id), str(instance), "sop"])

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "LUMBAR_PHANTOM"

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study.study_date
    ds.StudyTime = study.study_time
    ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = f"{study.study_time[:2]}{spec.series_number:02d}00"
    ds.AccessionNumber = study.accession
    ds.Modality = "MR"
    ds.Manufacturer = "Lumbar Node Phantom"
    ds.ManufacturerModelName = "Synthetic lumbar MRI"
    ds.SoftwareVersions = f"lumbar-node {__version__}"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "MRI LUMBAR SPINE WITHOUT CONTRAST (SYNTHETIC PHANTOM)"
    ds.SeriesDescription = spec.description
    ds.ProtocolName = f"L-SPINE {spec.description} {spec.contrast.name}"
    ds.BodyPartExamined = "LSPINE"
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = study.birth_date
    ds.PatientSex = study.sex
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "Synthetic phantom: no real patient"

    contrast = spec.contrast
    ds.ScanningSequence = ["IR", "SE"] if contrast.ti is not None else "SE"
    ds.SequenceVariant = "SK"
    ds.ScanOptions = "FS" if contrast.name == "STIR" else ""
    ds.MRAcquisitionType = "2D"
    ds.SequenceName = f"*tse2d1_{contrast.echo_train}"
    ds.SliceThickness = _ds(spec.thickness)
    ds.SpacingBetweenSlices = _ds(spec.spacing)
    ds.RepetitionTime = _ds(contrast.tr)
    ds.EchoTime = _ds(contrast.te)
    if contrast.ti is not None:
        ds.InversionTime = _ds(contrast.ti)
    ds.EchoTrainLength = contrast.echo_train
    ds.NumberOfAverages = "1"
    ds.ImagingFrequency = _ds(42.577478 * spec.field_strength)
    ds.ImagedNucleus = "1H"
    ds.EchoNumbers = "1"
    ds.MagneticFieldStrength = _ds(spec.field_strength)
    ds.FlipAngle = _ds(contrast.flip_angle)
    ds.PatientPosition = "HFS"

    ds.StudyInstanceUID = study.study_uid
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[str(study.seed), str(spec.series_id), "series"])
    ds.StudyID = str(study.study_id % 10**16)
    ds.SeriesNumber = spec.series_number
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = instance
    ds.ImagesInAcquisition = len(spec.planes)
    ds.FrameOfReferenceUID = study.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.PatientOrientation = [direction_letters(plane.row_dir), direction_letters(plane.col_dir)]

    ds.ImagePositionPatient = [_ds(v) for v in plane.position]
    ds.ImageOrientationPatient = [_ds(round(v, 6)) for v in (*plane.row_dir, *plane.col_dir)]
    ds.PixelSpacing = [_ds(plane.row_spacing), _ds(plane.col_spacing)]
    ds.SliceLocation = _ds(float(plane.position @ plane.normal))

    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    lo, hi = np.percentile(pixels[::4, ::4], [1, 99.5])
    ds.WindowCenter = _ds(round(float(lo + hi) / 2))
    ds.WindowWidth = _ds(max(round(float(hi - lo)), 1))
    ds.PixelData = pixels.astype("<u2").tobytes()
    return ds


def rle_encoding_plugin() -> str:
    """pydicom's RLE Lossless encoder to use: ``pylibjpeg`` (pylibjpeg-rle, a compiled encoder,
    about ten times faster) when installed, else pydicom's own. Both write the same bytes; GDCM's
    encoder (pydicom's first choice when python-gdcm is installed) writes other ones."""
    return "pylibjpeg" if "pylibjpeg" in RLELosslessEncoder.available_plugins else "pydicom"


def kaggle_dataset(study: StudyInfo, spec: SeriesSpec, slice_index: int, pixels: NDArray[np.uint16]) -> Dataset:
    """One instance encoded as the RSNA 2024 Kaggle files are (measured on real competition files):

    - no SOPClassUID in the data set; the file meta says Enhanced MR Image Storage although the
      image is a classic single-frame MR image (no functional groups);
    - no Modality, BodyPartExamined, PatientName, StudyDate/StudyTime, ReferringPhysicianName,
      AccessionNumber, nor sequence parameters (ScanningSequence, TR, TE, TI);
    - PatientID = StudyInstanceUID = the study id, SeriesInstanceUID "<study_id>.<series_id>",
      SeriesDescription only "T1" or "T2" (the roles live in train_series_descriptions.csv);
    - SOPInstanceUID "<study_id>.1.<instance_number>": the same value in every series of the study;
    - a FrameOfReferenceUID of its own per series (patient coordinates consistent across series);
    - RLE Lossless, 16 bits allocated, 12 stored; no group length in the file meta (the writer,
      phantom.generate.write_study, writes the file meta as it is).
    """
    plane: ImagePlane = spec.planes[slice_index]
    instance = spec.instance_numbers[slice_index]
    study_id = str(study.study_id)
    sop_uid = UID(f"{study_id}.1.{instance}")

    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = EnhancedMRImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = RLELossless
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "LUMBAR_PHANTOM"

    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    ds.SOPInstanceUID = sop_uid
    ds.SeriesDescription = "T1" if spec.contrast.name == "T1" else "T2"
    ds.PatientID = study_id
    ds.SliceThickness = _ds(spec.thickness)
    ds.SpacingBetweenSlices = _ds(spec.spacing)
    ds.StudyInstanceUID = study_id
    ds.SeriesInstanceUID = f"{study_id}.{spec.series_id}"
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [_ds(v) for v in plane.position]
    ds.ImageOrientationPatient = [_ds(round(v, 6)) for v in (*plane.row_dir, *plane.col_dir)]
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[str(study.seed), study_id, str(spec.series_id), "frame"])
    ds.SliceLocation = _ds(float(plane.position @ plane.normal))
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelSpacing = [_ds(plane.row_spacing), _ds(plane.col_spacing)]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    lo, hi = np.percentile(pixels[::4, ::4], [1, 99.5])
    ds.WindowCenter = _ds(round(float(lo + hi) / 2))
    ds.WindowWidth = _ds(max(round(float(hi - lo)), 1))
    ds.compress(RLELossless, np.ascontiguousarray(pixels.astype("<u2")), encoding_plugin=rle_encoding_plugin(),
                generate_instance_uid=False)
    return ds


def phantom_dataset(style: PhantomStyle, study: StudyInfo, spec: SeriesSpec, slice_index: int,
                    pixels: NDArray[np.uint16]) -> Dataset:
    """One instance of a phantom series in the given style."""
    build = kaggle_dataset if style is PhantomStyle.KAGGLE else mr_dataset
    return build(study, spec, slice_index, pixels)
