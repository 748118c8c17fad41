"""The result of a series as a DICOM Structured Report: a pure builder, no I/O.

:func:`build_sr` turns the headers of a source series and its
:class:`~triage_node.domain.SeriesResult` into a Comprehensive 3D SR holding a TID 1500
Measurement Report, in the spirit of the IHE AI Results (AIR) profile, built with highdicom::

    Imaging Measurement Report (TID 1500)
    ├── language, observation context: device observer (TID 1004)
    ├── procedure reported: CT unspecified body region
    ├── Image Library (TID 1600): the key slice
    ├── Imaging Measurements
    │   └── one Measurement Group (TID 1501) per label in domain.LABELS:
    │       ├── tracking identifier, finding type, Algorithm Identification (TID 4019:
    │       │   name, version, parameters "model_sha256=...", "threshold=...")
    │       ├── qualitative evaluation: <finding> = Present / Absent (at the threshold)
    │       └── measurement: Probability (no units, 0..1), inferred from the slice with the
    │           highest probability of that label (the key slice for "any")
    └── Qualitative Evaluations: overall finding (Present / Absent) and the disclaimer

The SR copies the patient and study of the source so the PACS files it into the same
study, lists every source slice in the Current Requested Procedure Evidence Sequence, and
lies in a series of its own. A recomputed result gets a new SR that names the earlier one
in the Predecessor Documents Sequence (``supersedes``).

Findings are SNOMED CT codes; epidural hemorrhage, for which no code was verified when this
was written, is a code of the local scheme ``99TRIAGE`` (declared in the Coding Scheme
Identification Sequence).
"""

from __future__ import annotations

import copy
import datetime as dt
import math
from collections.abc import Mapping, Sequence

import highdicom as hd
import numpy as np
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from pydicom.valuerep import DA, DT, TM

from triage_node.domain import LABELS, SeriesResult

__all__ = [
    "ALGORITHM_MANUFACTURER",
    "DEFAULT_SERIES_DESCRIPTION",
    "DEFAULT_SR_SERIES_NUMBER",
    "DEVICE_OBSERVER_UID",
    "FINDING_CODES",
    "LOCAL_SCHEME",
    "build_sr",
    "sr_series_uid",
]

#: Root of the UIDs the node derives (pydicom's root; the phantom uses the same one).
UID_ROOT = "1.2.826.0.1.3680043.8.498."

#: Coding scheme designator of the node's own codes.
LOCAL_SCHEME = "99TRIAGE"

#: The finding each label stands for.
FINDING_CODES: Mapping[str, hd.sr.CodedConcept] = {
    "any": hd.sr.CodedConcept("1386000", "SCT", "Intracranial hemorrhage"),
    "epidural": hd.sr.CodedConcept("EPIDURAL", LOCAL_SCHEME, "Epidural hemorrhage"),
    "intraparenchymal": hd.sr.CodedConcept("274100004", "SCT", "Cerebral hemorrhage"),
    "intraventricular": hd.sr.CodedConcept(
        "274110009", "SCT", "Intraventricular hemorrhage"
    ),
    "subarachnoid": hd.sr.CodedConcept(
        "21454007", "SCT", "Subarachnoid intracranial hemorrhage"
    ),
    "subdural": hd.sr.CodedConcept("35486000", "SCT", "Subdural intracranial hemorrhage"),
}

#: Series Number of the SR series (high, so PACS list it after the images).
DEFAULT_SR_SERIES_NUMBER = 9901
DEFAULT_SERIES_DESCRIPTION = "AI ICH triage result"
ALGORITHM_MANUFACTURER = "triage-node"
#: Device Observer UID of the node (TID 1004), fixed so every SR names the same device.
DEVICE_OBSERVER_UID = str(generate_uid(UID_ROOT, entropy_srcs=["triage-node-device-observer"]))

_QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
_PROBABILITY = hd.sr.CodedConcept.from_code(codes.DCM.Probability)
_NO_UNITS = hd.sr.CodedConcept.from_code(codes.UCUM.NoUnits)
_PRESENT = hd.sr.CodedConcept.from_code(codes.SCT.Present)
_ABSENT = hd.sr.CodedConcept.from_code(codes.SCT.Absent)
_COMMENT = hd.sr.CodedConcept.from_code(codes.DCM.Comment)

#: Type 2 attributes highdicom reads from the first evidence dataset (empty when missing).
_TYPE2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
_PATIENT_SEXES = frozenset({"", "M", "F", "O"})
_REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


def sr_series_uid(source_series_instance_uid: str) -> str:
    """The Series Instance UID of the SRs about one source series (derived, stable).

    Every SR about a series, the first and those superseding it, lies in this one series,
    so a PACS shows a single result series next to the images.

    Parameters
    ----------
    source_series_instance_uid : str
        The Series Instance UID of the classified CT series.

    Returns
    -------
    str
        A UID under the node's root, the same for the same input.
    """
    if not isinstance(source_series_instance_uid, str):
        raise TypeError(
            "source_series_instance_uid must be a str, not "
            f"{type(source_series_instance_uid).__name__}"
        )
    if not source_series_instance_uid:
        raise ValueError("source_series_instance_uid must not be empty")
    return str(generate_uid(UID_ROOT, entropy_srcs=["triage-node-sr", source_series_instance_uid]))


def build_sr(
    sources: Sequence[Dataset],
    result: SeriesResult,
    *,
    disclaimer: str,
    sop_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    series_number: int = DEFAULT_SR_SERIES_NUMBER,
    instance_number: int = 1,
    series_description: str = DEFAULT_SERIES_DESCRIPTION,
    created_at: dt.datetime | None = None,
    supersedes: Dataset | None = None,
    device_observer_uid: str = DEVICE_OBSERVER_UID,
    device_name: str = "triage-node",
    software_version: str = "",
) -> Dataset:
    """Build the Structured Report of one series' result.

    Parameters
    ----------
    sources : sequence of pydicom.Dataset
        Headers (pixel data not needed) of the source series' instances; they become the
        evidence. Each needs SOP Class, SOP Instance, Study and Series Instance UIDs; the
        key slice (``result.key_sop_instance_uid``) must be among them, with its patient
        and study attributes, which the SR copies (missing type 2 ones are left empty).
    result : SeriesResult
        The stored result: probabilities of every label in ``domain.LABELS``, threshold,
        key slice, model name, version and SHA-256.
    disclaimer : str
        Free text put into the report, e.g. ``"Triage aid - not for diagnostic use"``.
    sop_instance_uid : str, optional
        The SR's SOP Instance UID; a new one when omitted. Pass the stored one to rebuild
        an identical document.
    series_instance_uid : str, optional
        The SR's series; :func:`sr_series_uid` of the source series when omitted.
    series_number, instance_number : int, optional
        Series Number (default 9901) and Instance Number (>= 1) of the SR.
    series_description : str, optional
        Series Description of the SR series.
    created_at : datetime, optional
        Timezone-aware creation time, recorded as Content and Instance Creation Date and
        Time in UTC; ``result.inference_done_at`` when omitted (so a rebuild is identical).
    supersedes : pydicom.Dataset, optional
        The earlier SR about the same series that this one replaces (only its UIDs are
        used): referenced in the Predecessor Documents Sequence.
    device_observer_uid : str, optional
        Device Observer UID (TID 1004).
    device_name : str, optional
        Device Observer Name.
    software_version : str, optional
        Software Versions of the node (empty: not recorded).

    Returns
    -------
    pydicom.Dataset
        A Comprehensive 3D SR (a :class:`highdicom.sr.Comprehensive3DSR`), explicit VR
        little endian, with file meta, ready for ``dcmwrite`` or C-STORE.

    Raises
    ------
    TypeError
        If an argument has the wrong type (the argument is named).
    ValueError
        If an argument has a bad value: sources of another series or study, key slice
        missing from ``sources``, a label's probability missing or outside [0, 1], an
        empty disclaimer, a naive ``created_at`` (the argument is named).
    """
    key = _check_sources(sources, result)
    _check_result(result)
    if not isinstance(disclaimer, str):
        raise TypeError(f"disclaimer must be a str, not {type(disclaimer).__name__}")
    if not disclaimer.strip():
        raise ValueError("disclaimer must not be empty")
    for name, value in (("series_number", series_number), ("instance_number", instance_number)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, not {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    when = result.inference_done_at if created_at is None else created_at
    if not isinstance(when, dt.datetime):
        raise TypeError(f"created_at must be a datetime, not {type(when).__name__}")
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError(f"created_at must be timezone-aware, got {when.isoformat()}")
    when = when.astimezone(dt.UTC)
    if supersedes is not None:
        if not isinstance(supersedes, Dataset):
            raise TypeError(f"supersedes must be a Dataset, not {type(supersedes).__name__}")
        for attr in _REQUIRED_UIDS:
            if not supersedes.get(attr):
                raise ValueError(f"supersedes has no {attr}")

    reference = _reference_header(key)
    algorithm = hd.sr.AlgorithmIdentification(
        name=result.model_name,
        version=result.model_version,
        parameters=[f"model_sha256={result.model_sha256}", f"threshold={result.threshold:g}"],
        manufacturer=ALGORITHM_MANUFACTURER,
    )
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    groups = [
        _label_group(label, result, algorithm, by_uid) for label in LABELS
    ]
    observer = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=device_observer_uid,
                name=device_name,
                manufacturer_name=ALGORITHM_MANUFACTURER,
                model_name=result.model_name,
            ),
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=observer,
        procedure_reported=codes.cid100.CTUnspecifiedBodyRegion,
        imaging_measurements=groups,
        referenced_images=[reference],
    )
    report[0].ContentSequence.append(_summary(result, disclaimer))

    sr = hd.sr.Comprehensive3DSR(
        evidence=[reference, *(ds for ds in sources if ds is not key)],
        content=report[0],
        series_instance_uid=series_instance_uid or sr_series_uid(result.series_instance_uid),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid or str(generate_uid(UID_ROOT)),
        instance_number=instance_number,
        manufacturer=ALGORITHM_MANUFACTURER,
        # UTF-8 whatever the source's character set: any disclaimer text can be encoded.
        specific_character_set="ISO_IR 192",
        is_complete=True,
        previous_versions=[supersedes] if supersedes is not None else None,
        series_description=series_description,
        manufacturer_model_name=device_name,
        software_versions=software_version or None,
        content_date=when.date(),
        content_time=when.time().replace(tzinfo=None),
        coding_schemes=[
            CodingSchemeIdentificationItem(
                designator=LOCAL_SCHEME,
                name="triage-node local codes",
                responsible_organization="triage-node",
            )
        ],
    )
    date, time = DA(when.strftime("%Y%m%d")), TM(when.strftime("%H%M%S.%f"))
    sr.InstanceCreationDate, sr.InstanceCreationTime = date, time
    sr.SeriesDate, sr.SeriesTime = date, time
    sr.ContentDate, sr.ContentTime = date, time
    sr.PatientName = key.get("PatientName", "")  # the source's, as it is (see _reference_header)
    sr.TimezoneOffsetFromUTC = "+0000"
    for item in sr.get("ContributingEquipmentSequence", []):  # highdicom stamps "now"
        item.ContributionDateTime = DT(when.strftime("%Y%m%d%H%M%S.%f+0000"))
    return sr


# --------------------------------------------------------------------------- internals


def _check_sources(sources: Sequence[Dataset], result: SeriesResult) -> Dataset:
    """Validate ``sources`` against ``result``; return the key slice's header."""
    if not isinstance(result, SeriesResult):
        raise TypeError(f"result must be a SeriesResult, not {type(result).__name__}")
    if isinstance(sources, Dataset) or not isinstance(sources, Sequence):
        raise TypeError("sources must be a sequence of pydicom Datasets")
    if not sources:
        raise ValueError("sources must not be empty")
    key: Dataset | None = None
    study = None
    for i, ds in enumerate(sources):
        if not isinstance(ds, Dataset):
            raise TypeError(f"sources[{i}] must be a pydicom Dataset, not {type(ds).__name__}")
        for attr in _REQUIRED_UIDS:
            if not ds.get(attr):
                raise ValueError(f"sources[{i}] has no {attr}")
        if ds.SeriesInstanceUID != result.series_instance_uid:
            raise ValueError(
                f"sources[{i}] is of series {ds.SeriesInstanceUID}, not of the result's "
                f"series {result.series_instance_uid}"
            )
        study = study or ds.StudyInstanceUID
        if ds.StudyInstanceUID != study:
            raise ValueError(
                f"sources[{i}] is of study {ds.StudyInstanceUID}, sources[0] of {study}"
            )
        if key is None and ds.SOPInstanceUID == result.key_sop_instance_uid:
            key = ds
    if key is None:
        raise ValueError(
            f"sources: the key slice {result.key_sop_instance_uid} is not among them"
        )
    return key


def _check_result(result: SeriesResult) -> None:
    """Every label has a probability in [0, 1]; the threshold too."""
    for label in LABELS:
        p = result.probabilities.get(label)
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 <= p <= 1.0:
            raise ValueError(f"result.probabilities[{label!r}] must be in [0, 1], got {p!r}")
    t = result.threshold
    if isinstance(t, bool) or not isinstance(t, int | float) or not 0.0 <= t <= 1.0:
        raise ValueError(f"result.threshold must be in [0, 1], got {t!r}")
    for field in ("model_name", "model_version", "model_sha256"):
        if not getattr(result, field):
            raise ValueError(f"result.{field} must not be empty")


def _reference_header(key: Dataset) -> Dataset:
    """A copy of the key slice's header as highdicom wants the first evidence dataset.

    Type 2 attributes highdicom reads are added empty when missing. Values highdicom
    rejects but real headers carry (patient sex "U", a malformed date) are left empty
    rather than failing the SR: a PACS files it by Patient ID and Study Instance UID. A
    de-identified source without its required De-identification Method gets a placeholder
    one, so the SR does not inherit the source's error. The
    patient name, which highdicom warns about unless it has a "^", is a placeholder here;
    :func:`build_sr` puts the source's back.
    """
    header = Dataset()
    for element in key:
        if element.tag.group > 0x0002 and element.keyword != "PixelData":
            header.add(copy.deepcopy(element))
    for keyword in _TYPE2_COPIED:
        if keyword not in header or header[keyword].value is None:
            setattr(header, keyword, "")
    if str(header.PatientSex) not in _PATIENT_SEXES:
        header.PatientSex = ""
    for keyword, parse in (("PatientBirthDate", DA), ("StudyDate", DA), ("StudyTime", TM)):
        value = header[keyword].value
        try:
            if value:
                parse(str(value))
        except ValueError:
            header[keyword].value = ""
    if (
        str(header.get("PatientIdentityRemoved", "")).upper() == "YES"
        and not header.get("DeidentificationMethod")
        and not header.get("DeidentificationMethodCodeSequence")
    ):  # required then (type 1C); de-identified sources leave it out
        header.DeidentificationMethod = "not stated in the source images"
    header.PatientName = "^"
    return header


def _slice_of_max(label: str, result: SeriesResult) -> str:
    """SOP Instance UID of the slice with the highest probability of ``label``."""
    if label == "any" or not result.slices:
        return result.key_sop_instance_uid
    index = LABELS.index(label)
    best = max(result.slices, key=lambda s: s[2][index] if len(s[2]) > index else -math.inf)
    return best[0]


def _label_group(
    label: str,
    result: SeriesResult,
    algorithm: hd.sr.AlgorithmIdentification,
    by_uid: Mapping[str, Dataset],
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The TID 1501 group of one label: present/absent and the probability."""
    finding = FINDING_CODES[label]
    probability = float(result.probabilities[label])
    uid = _slice_of_max(label, result)
    if uid not in by_uid:  # header not given: fall back to the key slice
        uid = result.key_sop_instance_uid
    image = by_uid[uid]
    tracking = hd.sr.TrackingIdentifier(
        uid=str(
            generate_uid(
                UID_ROOT, entropy_srcs=["triage-node-label", result.series_instance_uid, label]
            )
        ),
        identifier=f"ICH triage: {label}",
    )
    measurement = hd.sr.Measurement(
        name=_PROBABILITY,
        value=probability,
        unit=_NO_UNITS,
        referenced_images=[
            hd.sr.SourceImageForMeasurement(str(image.SOPClassUID), str(image.SOPInstanceUID))
        ],
    )
    present = probability >= result.threshold
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        finding_type=finding,
        algorithm_id=algorithm,
        measurements=[measurement],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=finding, value=_PRESENT if present else _ABSENT)
        ],
    )


def _summary(result: SeriesResult, disclaimer: str) -> hd.sr.ContainerContentItem:
    """The root's Qualitative Evaluations: the overall finding and the disclaimer."""
    container = hd.sr.ContainerContentItem(
        name=_QUALITATIVE_EVALUATIONS,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    container.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.CodeContentItem(
                name=FINDING_CODES["any"],
                value=_PRESENT if result.flagged else _ABSENT,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            ),
            hd.sr.TextContentItem(
                name=_COMMENT,
                value=disclaimer,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            ),
        ]
    )
    return container


#: Series Number of the key-image Secondary Captures (next to the SR series, 9901).
DEFAULT_KEY_IMAGE_SERIES_NUMBER = 9902


def key_image_series_uid(source_series_instance_uid: str) -> str:
    """The Series Instance UID of the key images about one source series (derived, stable)."""
    if not isinstance(source_series_instance_uid, str) or not source_series_instance_uid:
        raise ValueError("source_series_instance_uid must be a non-empty str")
    return str(generate_uid(UID_ROOT, entropy_srcs=["triage-node-key-image",
                                                    source_series_instance_uid]))


def build_key_image(
    key: Dataset,
    rgb: NDArray[np.uint8],
    result: SeriesResult,
    *,
    disclaimer: str,
    instance_number: int = 1,
    sop_instance_uid: str | None = None,
    manufacturer: str = "triage-node",
) -> Dataset:
    """A Secondary Capture of the key slice with its heatmap, for PACS that cannot show SR.

    Parameters
    ----------
    key : pydicom.Dataset
        Header of the key slice (``result.key_sop_instance_uid``): patient and study are
        copied from it, and it is the SC's source image.
    rgb : numpy.ndarray
        ``(rows, columns, 3)`` uint8: the key slice in brain window with the heatmap.
    result : SeriesResult
        The result shown; its ``any`` probability, flag and model go into the text.
    disclaimer : str
        Put into Image Comments, after the result.
    instance_number : int, optional
        Instance Number (>= 1) in the key-image series.
    sop_instance_uid : str, optional
        A new one when omitted.
    manufacturer : str, optional
        Manufacturer of the SC equipment.

    Returns
    -------
    pydicom.Dataset
        The Secondary Capture Image Storage dataset, in its own derived series of the
        patient's study.

    Raises
    ------
    TypeError, ValueError
        If ``rgb`` is not an (rows, columns, 3) uint8 array or the key slice is not the
        result's.
    """
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or \
            rgb.shape[2] != 3:
        raise ValueError(f"rgb must be a (rows, columns, 3) uint8 array, got "
                         f"{getattr(rgb, 'shape', None)} {getattr(rgb, 'dtype', type(rgb))}")
    if str(key.get("SOPInstanceUID", "")) != result.key_sop_instance_uid:
        raise ValueError("key must be the header of the result's key slice "
                         f"{result.key_sop_instance_uid}")
    if isinstance(instance_number, bool) or not isinstance(instance_number, int) or \
            instance_number < 1:
        raise ValueError(f"instance_number must be an int >= 1, got {instance_number!r}")
    header = _reference_header(key)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=header,
        pixel_array=np.ascontiguousarray(rgb),
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=key_image_series_uid(result.series_instance_uid),
        series_number=DEFAULT_KEY_IMAGE_SERIES_NUMBER,
        sop_instance_uid=sop_instance_uid or str(generate_uid(UID_ROOT)),
        instance_number=instance_number,
        manufacturer=manufacturer,
        patient_orientation=("L", "P"),
        transfer_syntax_uid="1.2.840.10008.1.2.1",
    )
    sc.PatientName = key.get("PatientName", "")
    sc.SeriesDescription = "ICH triage key image (AI)"
    verdict = "SUSPECTED ICH" if result.flagged else "no ICH suspected"
    sc.ImageComments = (f"{verdict}: any={result.probabilities['any']:.2f} (threshold "
                        f"{result.threshold:.2f}), {result.model_name} {result.model_version}."
                        f" Heatmap: where the model looked. {disclaimer}")[:10240]
    sc.BurnedInAnnotation = "NO"
    if "Laterality" not in sc:  # type 2C; dciodvfy wants it present (empty: unpaired)
        sc.Laterality = ""
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.DerivationDescription = "key slice in brain window with the classifier's heatmap"
    ref = Dataset()
    ref.ReferencedSOPClassUID = key.SOPClassUID
    ref.ReferencedSOPInstanceUID = key.SOPInstanceUID
    sc.SourceImageSequence = [ref]
    return sc
