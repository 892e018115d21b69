"""PS3.15 Annex E Basic Application Level Confidentiality Profile, with options, over pydicom.

:func:`deidentify` is pure: it reads the input dataset and returns a new one (file meta too);
the input is never modified. Every decision comes from Table E.1-1 (:mod:`anonymizer.table`)
plus the few documented rules below for what the table does not list:

- Combined actions (E.1.1: "X unless Z/D is required to keep the IOD valid"): the gateway does
  not know the Type of an attribute in every IOD it may receive, so it takes the choice that is
  valid whatever the Type — anything with D → D (a dummy value), X/Z → Z (empty), X/Z/U* → U
  (the sequence stays, its UIDs are replaced). Sequences differ: an empty sequence is valid
  only for Type 2, so X/Z, X/D and X/Z/D remove them and Z/D empties them; a D sequence has its
  items rebuilt under the strict rules (a "dummy" sequence: structure kept, no content).
- Attributes the table does not list ("unlisted"), deny by default where they could carry PHI:
  numeric, coded (CS) and binary values are kept; UIDs are kept when they are well-known
  (a registered SOP Class, Transfer Syntax...) and replaced otherwise; dates are removed (or
  shifted with the modified-dates option), times removed (or kept with it); names (PN) and ages
  are removed; other free text is kept only for a short allow-list of technical attributes
  (:data:`SAFE_TEXT`) and never inside a sequence being rebuilt as a dummy; sequences are kept
  and their items processed recursively at any depth.
- Private attributes are removed unless allow-listed (Retain Safe Private option); the whole
  60xx overlay group goes with its Overlay Data (a plane without data would be invalid).
- C (clean): text → only words of a fixed clinical/technical vocabulary are kept
  (:data:`CLEAN_VOCABULARY`), dates → shifted by the per-patient offset, times → kept,
  sequences → rebuilt strictly; where nothing can be cleaned the basic action applies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache
from typing import Any

from pydicom import config
from pydicom.datadict import dictionary_description, dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID_dictionary

from anonymizer import pseudonym
from anonymizer.profile import Profile
from anonymizer.table import STANDARD_EDITION, Action, Option, Rule, Table, load_table
from inference.errors import DefacegateError


class DeidentificationError(DefacegateError):
    """This instance must not be forwarded (e.g. burned-in annotation): quarantine the series."""


class Effect(Enum):
    """What happened to one attribute (for the dry run and tests)."""

    REMOVED = "removed"
    EMPTIED = "emptied"
    DUMMY = "dummy value"
    KEPT = "kept"
    CLEANED = "cleaned"
    UID = "UID replaced"
    PSEUDONYM = "pseudonym"
    SHIFTED = "date shifted"
    ITEMS = "items processed"
    ADDED = "added"


@dataclass(frozen=True)
class Decision:
    """One attribute's fate. ``path`` locates nested attributes, e.g. ``(0040,0275)[0]>``."""

    path: str
    tag: int
    name: str
    rule: str  # the table code (e.g. "X/Z/D") or the unlisted-attribute rule that decided
    effect: Effect
    result: str  # masked: never the original value


# Attributes the gateway itself writes (PS3.15 E.1.1 6, PS3.3 C.7.1.1, C.7.6.1).
_ADDED_BY_US = frozenset({0x00120062, 0x00120063, 0x00120064, 0x00280303, 0x00280302})
_PATIENT_NAME, _PATIENT_ID = 0x00100010, 0x00100020
_ACCESSION, _STUDY_ID = 0x00080050, 0x00200010
_SOP_INSTANCE_UID = 0x00080018

_NUMERIC_VRS = frozenset(
    {"CS", "DS", "IS", "US", "SS", "UL", "SL", "UV", "SV", "FL", "FD", "AT"}
    | {"OB", "OW", "OF", "OD", "OL", "OV", "US or SS", "OB or OW", "US or OW", "US or SS or OW"}
)
_TEXT_VRS = frozenset({"LO", "SH", "ST", "LT", "UT", "UC", "UR", "AE"})
_DATE_VRS = frozenset({"DA", "DT", "TM"})

#: Unlisted free-text attributes kept outside rebuilt ("dummy") sequences: technical or coded
#: content that the CT IODs need and that does not describe the patient.
SAFE_TEXT = frozenset(
    {
        "Manufacturer",
        "ManufacturerModelName",
        "SoftwareVersions",
        "ConvolutionKernel",
        "FilterType",
        "RescaleType",
        "WindowCenterWidthExplanation",
        "PositionReferenceIndicator",
        "ContrastBolusRoute",
        "CodeValue",
        "CodingSchemeDesignator",
        "CodingSchemeVersion",
        "CodeMeaning",
        "LongCodeValue",
        "URNCodeValue",
        "MappingResourceName",
        "ReconstructionMethod",
        "StackID",  # Enhanced CT: In-Stack Position Number is conditional on it
    }
)

#: Words kept by the Clean Descriptors option (C on free text): modality, anatomy, phase and
#: reconstruction vocabulary of head and neck CT(A). Anything else in a descriptor is dropped.
_VOCABULARY_TEXT = """
    CT CTA ANGIO ANGIOGRAPHY ANGIOGRAM HEAD NECK BRAIN SKULL FACE FACIAL CAROTID CAROTIDS
    VERTEBRAL BASILAR CIRCLE WILLIS COW ARCH AORTIC INTRACRANIAL EXTRACRANIAL CERVICAL SPINE
    SINUS SINUSES ORBIT ORBITS TEMPORAL ARTERIAL ARTERY ARTERIES VENOUS VENOGRAM PHASE DELAYED
    EARLY LATE CONTRAST NON WITH WITHOUT W WO AND OF THE TO AXIAL AX CORONAL COR SAGITTAL SAG
    OBLIQUE MIP MINIP MPR VR VRT 3D 2D THIN THICK SLICE SLICES MM SOFT TISSUE BONE STANDARD
    SHARP SMOOTH KERNEL RECON RECONSTRUCTION SCOUT TOPOGRAM LOCALIZER SURVIEW PERFUSION DOSE
    REPORT PRE POST BOLUS TRACKING TEST ROUTINE PROTOCOL DUAL ENERGY KEV KV MONO IODINE IMAGE
    IMAGES SERIES STUDY HELICAL SPIRAL SEQUENCE DEFACED ORIGINAL DERIVED PRIMARY SECONDARY
    """
CLEAN_VOCABULARY = frozenset(_VOCABULARY_TEXT.split())
# Words that carry no meaning alone: a cleaned value made only of these is no value at all.
_STOPWORDS = frozenset({"AND", "OF", "THE", "TO", "WITH", "WITHOUT", "W", "WO", "NON"})
_NUMBER_TOKEN = re.compile(r"^\d(\.\d{1,3})?$")
_TOKEN = re.compile(r"[A-Za-z0-9.]+")

_DUMMY_TEXT = "ANONYMIZED"
_DUMMIES: dict[str, Any] = {
    "PN": "ANONYMOUS^ANONYMOUS",
    "DA": "20000101",
    "TM": "000000",
    "DT": "20000101000000",
    "AS": "000Y",
    "CS": "ANONYMIZED",
    "DS": "0",
    "IS": "0",
    "UR": "urn:anonymized",
    "FL": 0.0,
    "FD": 0.0,
    "US": 0,
    "SS": 0,
    "UL": 0,
    "SL": 0,
    "UV": 0,
    "SV": 0,
    "AT": 0,
}

_CID_7050: dict[Option | str, tuple[str, str]] = {
    "basic": ("113100", "Basic Application Confidentiality Profile"),
    "facemask": ("113102", "Clean Recognizable Visual Features Option"),
    Option.CLEAN_DESCRIPTORS: ("113105", "Clean Descriptors Option"),
    Option.RETAIN_LONGITUDINAL_MODIFIED_DATES: (
        "113107",
        "Retain Longitudinal Temporal Information Modified Dates Option",
    ),
    Option.RETAIN_PATIENT_CHARACTERISTICS: ("113108", "Retain Patient Characteristics Option"),
    Option.RETAIN_DEVICE_IDENTITY: ("113109", "Retain Device Identity Option"),
    Option.RETAIN_UIDS: ("113110", "Retain UIDs Option"),
    Option.RETAIN_SAFE_PRIVATE: ("113111", "Retain Safe Private Option"),
    Option.RETAIN_INSTITUTION_IDENTITY: ("113112", "Retain Institution Identity Option"),
}


def _tag_str(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _name(tag: int) -> str:
    try:
        return str(dictionary_description(tag))
    except KeyError:
        return "Unknown"


def _vr_of(elem: DataElement | RawDataElement) -> str:
    """The element's VR; implicit (None) or UN-encoded public tags get the dictionary VR."""
    vr = elem.VR
    if vr and vr != "UN":
        return str(vr)
    try:
        return str(dictionary_VR(elem.tag))
    except KeyError:
        return "UN"


# VRs whose single value pydicom keeps as a plain ``str``: no conversion needed.
_STR_VRS = frozenset({"LO", "SH", "ST", "LT", "UT", "UC", "UR", "AE", "CS", "UI", "DA", "DT", "TM"})


def _elem(tag: int, vr: str, value: Any) -> DataElement:
    """A new element from our own value: no validation or conversion beyond what is needed.

    Both cost per element per instance, and the header stage must do ≥ 1,000 instances/s.
    """
    tag = BaseTag(tag)  # DataElement would otherwise parse it with the general Tag()
    if isinstance(value, str) and vr in _STR_VRS:
        return DataElement(tag, vr, value, already_converted=True, validation_mode=config.IGNORE)
    return DataElement(tag, vr, value, validation_mode=config.IGNORE)


def _put(ds: Dataset, tag: int, elem: DataElement | RawDataElement) -> None:
    """``ds[tag] = elem`` for a new, public, non-sequence element in a new dataset.

    ``Dataset.__setitem__`` re-derives the tag and handles private creators, pixel-data caches
    and nested pixel representation; none applies here, and it is a fifth of the stage's time.
    Sequences and private elements still go through it.
    """
    if (tag >> 16) & 1 or elem.VR == "SQ":
        ds[tag] = elem
    else:
        ds._dict[BaseTag(tag)] = elem


def _ascii_values(raw: DataElement | RawDataElement) -> list[str]:
    """Values of an ASCII-only VR (UI, DA, DT) without pydicom's full conversion."""
    if isinstance(raw, RawDataElement):
        data = raw.value or b""
        text = data.decode("ascii", "replace").strip("\x00 ")
        return [v.strip("\x00 ") for v in text.split("\\")] if text else []
    return _strings(raw.value)


def _value(src: Dataset, raw: DataElement | RawDataElement) -> Any:
    """The decoded value of a non-sequence element, without caching it back into ``src``.

    ``src[tag]`` would store the converted element in the input dataset; converting directly
    keeps the input untouched and skips that bookkeeping (it is per element per instance).
    """
    if isinstance(raw, RawDataElement):
        encoding = src.original_character_set or src._character_set
        return convert_raw_data_element(raw, encoding=encoding, ds=src).value
    return raw.value


def _strings(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, MultiValue | list | tuple):
        return [str(v) for v in value]
    return [str(value)]


def _describe_value(value: Any) -> str:
    values = _strings(value)
    if not values or all(v == "" for v in values):
        return "empty"
    n = sum(len(v) for v in values)
    return f"<{len(values)} value{'s' if len(values) > 1 else ''}, {n} chars>"


_RESOLVED: dict[tuple[str, str, str], tuple[Action, str]] = {}


def resolve(rule: Rule, profile: Profile, vr: str) -> tuple[Action, str]:
    """The single action applied to ``rule`` under ``profile`` (and a label naming why)."""
    key = (profile.options_key, rule.pattern, vr)  # strings: cheap to hash, per element
    found = _RESOLVED.get(key)
    if found is None:
        found = _RESOLVED[key] = _resolve(rule, profile.options, vr)
    return found


def _resolve(rule: Rule, options: tuple[Option, ...], vr: str) -> tuple[Action, str]:
    chosen = [rule.option_action(o) for o in options]
    from_options = [a for a in chosen if a is not None]
    code = rule.basic
    label = code.value
    if from_options:
        code = Action.K if Action.K in from_options else Action.C
        label = f"{rule.basic.value}→{code.value} (option)"
    return _single(code, vr), label


def _single(code: Action, vr: str) -> Action:
    """Resolve a combined code to the choice valid for any attribute Type (module docstring)."""
    if vr == "SQ":
        # An empty sequence is valid only for Type 2; Type 3 sequences (most of these rows)
        # must be absent instead, and a Type 1 one would need a dummy item we cannot invent.
        combined = {
            Action.X_Z: Action.X,
            Action.X_Z_D: Action.X,
            Action.Z_D: Action.Z,
            Action.X_D: Action.X,
            Action.X_Z_U: Action.U,
        }
    else:
        combined = {
            Action.X_Z: Action.Z,
            Action.X_Z_D: Action.D,
            Action.Z_D: Action.D,
            Action.X_D: Action.D,
            Action.X_Z_U: Action.U,
        }
    return combined.get(code, code)


class _Run:
    """One de-identification of one instance; holds the per-patient state and the trace."""

    def __init__(self, profile: Profile, table: Table, patient_key: str, trace: bool) -> None:
        self.profile = profile
        self.table = table
        self.key = profile.key
        self.shift_days = pseudonym.date_shift_days(profile.key, patient_key)
        self.modified_dates = profile.retain_longitudinal_modified_dates
        self.decisions: list[Decision] | None = [] if trace else None

    # -- bookkeeping -------------------------------------------------------------------------
    def _note(
        self, path: str, tag: int, name: str, rule: str, effect: Effect, result: str = ""
    ) -> None:
        if self.decisions is not None:
            self.decisions.append(Decision(path + _tag_str(tag), tag, name, rule, effect, result))

    # -- datasets ----------------------------------------------------------------------------
    def dataset(self, src: Dataset, strict: bool, path: str) -> Dataset:
        out = Dataset()
        safe_blocks = self._safe_private_blocks(src)
        # values(): the unconverted elements in file order (elements() re-sorts BaseTags in
        # Python per dataset; the writer sorts anyway).
        for raw in src.values():
            tag = int(raw.tag)
            if isinstance(raw, RawDataElement) and raw.value is None and raw.length:
                raw = src[tag]  # a deferred read: load it now, the copy has no file behind it
            group, element = tag >> 16, tag & 0xFFFF
            if element == 0 or group == 0x0002:  # group lengths; stray file meta in the body
                self._note(path, tag, "Group Length / File Meta", "not copied", Effect.REMOVED)
                continue
            if group & 1:
                self._private(src, out, raw, tag, safe_blocks, path)
                continue
            rule = self.table.lookup(tag)
            vr = _vr_of(raw)
            if rule is None:
                self._unlisted(src, out, raw, tag, vr, strict, path)
            else:
                action, label = resolve(rule, self.profile, vr)
                self._apply(src, out, raw, tag, vr, rule, action, label, strict, path)
        return out

    def _safe_private_blocks(self, src: Dataset) -> dict[int, frozenset[int]]:
        """Creator tag → element offsets allowed in that block (Retain Safe Private)."""
        if not self.profile.safe_private:
            return {}
        blocks: dict[int, frozenset[int]] = {}
        for raw in src.values():
            tag = int(raw.tag)
            if not (tag >> 16) & 1 or not 0x0010 <= (tag & 0xFFFF) <= 0x00FF:
                continue  # not a private creator element
            creator = " ".join(_strings(_value(src, raw))).strip()
            offsets = frozenset(
                e.offset
                for e in self.profile.safe_private
                if e.group == tag >> 16 and e.creator == creator
            )
            if offsets:
                blocks[tag] = offsets
        return blocks

    def _private(
        self,
        src: Dataset,
        out: Dataset,
        raw: DataElement | RawDataElement,
        tag: int,
        safe_blocks: dict[int, frozenset[int]],
        path: str,
    ) -> None:
        group, element = tag >> 16, tag & 0xFFFF
        if 0x0010 <= element <= 0x00FF:
            keep = tag in safe_blocks
            creator_tag = tag
        else:
            creator_tag = (group << 16) | (element >> 8)
            keep = (element & 0xFF) in safe_blocks.get(creator_tag, frozenset())
        if keep:
            _put(out, tag, self._copy(src, raw))
            self._note(path, tag, "Private", "safe private allow-list", Effect.KEPT)
        else:
            self._note(path, tag, "Private", self.table.private.basic.value, Effect.REMOVED)

    def _copy(self, src: Dataset, raw: DataElement | RawDataElement) -> DataElement | Any:
        """A copy safe to hand out: raw elements are immutable; DataElements are rebuilt."""
        if isinstance(raw, RawDataElement):
            return raw
        value = raw.value
        if isinstance(value, Sequence):
            return _elem(raw.tag, raw.VR, Sequence([_deep_item(item) for item in value]))
        if isinstance(value, MultiValue):
            return _elem(raw.tag, raw.VR, list(value))
        # Scalars (str, bytes, numbers, PersonName) are immutable: share them as converted.
        return DataElement(
            raw.tag, raw.VR, value, already_converted=True, validation_mode=config.IGNORE
        )

    # -- unlisted ----------------------------------------------------------------------------
    def _unlisted(
        self,
        src: Dataset,
        out: Dataset,
        raw: DataElement | RawDataElement,
        tag: int,
        vr: str,
        strict: bool,
        path: str,
    ) -> None:
        name = _name(tag) if self.decisions is not None else ""
        group = tag >> 16
        if 0x6000 <= group <= 0x60FF:
            self._note(path, tag, name, "overlay group (with 60xx,3000)", Effect.REMOVED)
            return
        if vr == "SQ":
            self._sequence(src, out, tag, strict, path, name, "unlisted sequence")
            return
        if vr == "UI":
            values = _ascii_values(raw)
            if all(v in UID_dictionary or not v for v in values):
                _put(out, tag, self._copy(src, raw))
                self._note(path, tag, name, "unlisted well-known UID", Effect.KEPT)
            else:
                self._uid(out, tag, values, name, "unlisted instance UID: U", path)
            return
        if vr in _NUMERIC_VRS:
            _put(out, tag, self._copy(src, raw))
            self._note(path, tag, name, "unlisted numeric/coded", Effect.KEPT)
            return
        if strict and vr in _DATE_VRS | _TEXT_VRS | {"PN", "AS"}:
            # Inside a sequence being replaced by a dummy (D): keep the structure valid
            # (e.g. Type 1 code values) but no content.
            self._dummy(out, tag, vr, name, f"unlisted {vr} in dummy sequence: D", path)
            return
        if vr in _DATE_VRS:
            if self.modified_dates:
                self._clean_date(src, out, raw, tag, vr, name, "unlisted date: C", path, None)
            else:
                self._note(path, tag, name, "unlisted date/time: X", Effect.REMOVED)
            return
        if vr in _TEXT_VRS and not strict and keyword_for_tag(tag) in SAFE_TEXT:
            _put(out, tag, self._copy(src, raw))
            self._note(path, tag, name, "unlisted safe text", Effect.KEPT)
            return
        self._note(path, tag, name, f"unlisted {vr}: X", Effect.REMOVED)

    # -- table actions -----------------------------------------------------------------------
    def _apply(
        self,
        src: Dataset,
        out: Dataset,
        raw: DataElement | RawDataElement,
        tag: int,
        vr: str,
        rule: Rule,
        action: Action,
        label: str,
        strict: bool,
        path: str,
    ) -> None:
        name = rule.name
        if action is Action.X:
            self._note(path, tag, name, label, Effect.REMOVED)
        elif action is Action.K:
            if vr == "SQ":
                self._sequence(src, out, tag, strict, path, name, label)
            else:
                _put(out, tag, self._copy(src, raw))
                self._note(path, tag, name, label, Effect.KEPT)
        elif action is Action.U:
            if vr == "SQ":
                self._sequence(src, out, tag, strict, path, name, label)
            else:
                self._uid(out, tag, _ascii_values(raw), name, label, path)
        elif action is Action.C:
            self._clean(src, out, raw, tag, vr, rule, label, strict, path)
        elif action is Action.Z:
            if vr == "SQ":
                _put(out, tag, _elem(tag, "SQ", Sequence()))
                self._note(path, tag, name, label, Effect.EMPTIED)
            elif not self._pseudonym(src, out, tag, vr, name, label, path):
                _put(out, tag, _elem(tag, vr, None))
                self._note(path, tag, name, label, Effect.EMPTIED)
        elif action is Action.D:
            if vr == "SQ":
                self._sequence(src, out, tag, True, path, name, label)
            elif vr == "UI":
                self._uid(out, tag, _ascii_values(raw), name, label, path)
            elif not self._pseudonym(src, out, tag, vr, name, label, path):
                self._dummy(out, tag, vr, name, label, path)
        else:  # pragma: no cover - _single() leaves only single codes
            raise ValueError(f"unresolved action {action}")

    def _fallback(
        self,
        src: Dataset,
        out: Dataset,
        raw: DataElement | RawDataElement,
        tag: int,
        vr: str,
        rule: Rule,
        label: str,
        strict: bool,
        path: str,
    ) -> None:
        """C could not clean this value: apply the basic-profile action instead."""
        basic = _single(rule.basic, vr)
        if basic is Action.C:  # no basic-profile row is C; never loop
            basic = Action.X
        self._apply(
            src, out, raw, tag, vr, rule, basic, f"{label}, uncleanable→{basic.value}", strict, path
        )

    def _clean(
        self,
        src: Dataset,
        out: Dataset,
        raw: DataElement | RawDataElement,
        tag: int,
        vr: str,
        rule: Rule,
        label: str,
        strict: bool,
        path: str,
    ) -> None:
        name = rule.name
        if vr == "SQ":
            self._sequence(src, out, tag, True, path, name, label)
        elif vr in _DATE_VRS:
            if not self._clean_date(src, out, raw, tag, vr, name, label, path, rule):
                self._fallback(src, out, raw, tag, vr, rule, label, strict, path)
        elif vr == "CS":
            _put(out, tag, self._copy(src, raw))
            self._note(path, tag, name, label, Effect.KEPT)
        elif vr in _TEXT_VRS and vr != "AE" and vr != "UR":
            values = _strings(_value(src, raw))
            cleaned = [clean_text(v) for v in values]
            if values and all(cleaned):
                _put(out, tag, _elem(tag, vr, cleaned if len(cleaned) > 1 else cleaned[0]))
                if self.decisions is not None:
                    self._note(path, tag, name, label, Effect.CLEANED, _describe_value(cleaned))
            else:
                self._fallback(src, out, raw, tag, vr, rule, label, strict, path)
        else:
            self._fallback(src, out, raw, tag, vr, rule, label, strict, path)

    def _clean_date(
        self,
        src: Dataset,
        out: Dataset,
        raw: DataElement | RawDataElement,
        tag: int,
        vr: str,
        name: str,
        label: str,
        path: str,
        rule: Rule | None,
    ) -> bool:
        """Modified dates: DA/DT shifted back by the patient's offset, TM kept (whole days)."""
        if vr == "TM":
            _put(out, tag, self._copy(src, raw))
            self._note(path, tag, name, label, Effect.KEPT, "time of day kept")
            return True
        shift = pseudonym.shift_da if vr == "DA" else pseudonym.shift_dt
        values = _ascii_values(raw)
        shifted = [shift(v, self.shift_days) for v in values]
        if not values or any(s is None for s in shifted):
            if rule is None:
                self._note(path, tag, name, f"{label}, unparsable→X", Effect.REMOVED)
            return False
        new = [s for s in shifted if s is not None]
        _put(out, tag, _elem(tag, vr, new if len(new) > 1 else new[0]))
        self._note(path, tag, name, label, Effect.SHIFTED, "shifted by the patient offset")
        return True

    def _uid(
        self, out: Dataset, tag: int, values: list[str], name: str, label: str, path: str
    ) -> None:
        new = [pseudonym.pseudo_uid(self.key, v) if v.strip("\x00 ") else "" for v in values]
        _put(out, tag, _elem(tag, "UI", new if len(new) > 1 else (new[0] if new else None)))
        self._note(path, tag, name, label, Effect.UID, "keyed 2.25 UID")

    def _pseudonym(
        self, src: Dataset, out: Dataset, tag: int, vr: str, name: str, label: str, path: str
    ) -> bool:
        """Patient name/ID and accession/study IDs get keyed pseudonyms instead of Z/D."""
        if tag not in (_PATIENT_NAME, _PATIENT_ID, _ACCESSION, _STUDY_ID):
            return False
        original = _text(src, tag)
        if not original:
            _put(out, tag, _elem(tag, vr, None))
            self._note(path, tag, name, label, Effect.EMPTIED)
            return True
        if tag in (_PATIENT_NAME, _PATIENT_ID):
            value = pseudonym.pseudo_patient_id(self.key, self.profile.project_prefix, original)
            if tag == _PATIENT_NAME:
                # Name and ID carry the same code, derived from the ID when there is one, so a
                # patient's name pseudonym is stable even if the name is spelt differently.
                pid = _text(src, _PATIENT_ID)
                value = pseudonym.pseudo_patient_id(
                    self.key, self.profile.project_prefix, pid or original
                ).replace("-", "^", 1)  # PN form family^given (PS3.5 6.2.1.1)
        else:
            domain = "accession" if tag == _ACCESSION else "study-id"
            value = pseudonym.pseudo_short_id(self.key, domain, original)
        _put(out, tag, _elem(tag, vr, value))
        self._note(path, tag, name, label, Effect.PSEUDONYM, "keyed pseudonym")
        return True

    def _dummy(self, out: Dataset, tag: int, vr: str, name: str, label: str, path: str) -> None:
        if vr in ("OB", "OW", "OF", "OD", "OL", "OV", "UN", "OB or OW", "US or OW"):
            value: Any = b"\x00\x00"
            vr = "OB" if vr in ("UN", "OB or OW", "US or OW") else vr
        else:
            value = _DUMMIES.get(vr, _DUMMY_TEXT)
            if vr in ("US or SS", "US or SS or OW"):
                vr, value = "US", 0
            elif vr == "AE":
                value = "ANONYMOUS"
        _put(out, tag, _elem(tag, vr, value))
        self._note(path, tag, name, label, Effect.DUMMY, "dummy")

    def _sequence(
        self, src: Dataset, out: Dataset, tag: int, strict: bool, path: str, name: str, label: str
    ) -> None:
        items = _value(src, src.get_item(tag)) or []
        here = f"{path}{_tag_str(tag)}"
        effect_label = f"{label}{' (as dummy)' if strict else ''}"
        self._note(path, tag, name, effect_label, Effect.ITEMS, f"{len(items)} item(s)")
        new_items = [self.dataset(item, strict, f"{here}[{i}]>") for i, item in enumerate(items)]
        _put(out, tag, _elem(tag, "SQ", Sequence(new_items)))


def _deep_item(item: Dataset) -> Dataset:
    """Copy of a sequence item (only used for allow-listed private sequences)."""
    new = Dataset()
    for raw in item.elements():
        if isinstance(raw, RawDataElement):
            new[raw.tag] = raw
        elif isinstance(raw.value, Sequence):
            new[raw.tag] = _elem(raw.tag, "SQ", Sequence([_deep_item(i) for i in raw.value]))
        else:
            value = list(raw.value) if isinstance(raw.value, MultiValue) else raw.value
            new[raw.tag] = _elem(raw.tag, raw.VR, value)
    return new


def clean_text(value: str) -> str:
    """Keep only vocabulary words and small numbers (slice thickness, kernel): C for text."""
    kept = [
        tok
        for tok in _TOKEN.findall(value)
        if tok.upper().strip(".") in CLEAN_VOCABULARY or _NUMBER_TOKEN.match(tok)
    ]
    if all(tok.upper() in _STOPWORDS for tok in kept):
        return ""
    return " ".join(kept)


def patient_key(ds: Dataset) -> str:
    """What identifies the patient for the date shift: Patient ID, else Patient's Name."""
    return _text(ds, _PATIENT_ID) or _text(ds, _PATIENT_NAME)


def _text(ds: Dataset, tag: int) -> str:
    """The stripped text of ``tag`` in ``ds`` ("" if absent), decoded without caching."""
    raw = ds.get_item(tag)
    return " ".join(_strings(_value(ds, raw))).strip() if raw is not None else ""


@lru_cache(maxsize=64)
def _method_codes(
    options: tuple[Option, ...], facemask_applied: bool
) -> tuple[tuple[str, str], ...]:
    codes = [_CID_7050["basic"]]
    if facemask_applied:
        codes.append(_CID_7050["facemask"])
    codes.extend(_CID_7050[o] for o in options if o in _CID_7050)
    return tuple(codes)


def _method_items(profile: Profile, facemask_applied: bool) -> tuple[tuple[str, str], ...]:
    return _method_codes(profile.options, facemask_applied)


def _record_method(out: Dataset, profile: Profile, facemask_applied: bool) -> None:
    """PS3.15 E.1.1 6 / PS3.3 C.7.1.1: say that and how the instance was de-identified."""
    codes = _method_items(profile, facemask_applied)
    out[0x00120062] = _elem(0x00120062, "CS", "YES")  # Patient Identity Removed
    methods = [f"defacegate PS3.15 E.1-1 {STANDARD_EDITION} Basic Profile"]
    methods.extend(meaning[:64] for _, meaning in codes[1:])
    out[0x00120063] = _elem(0x00120063, "LO", methods)  # De-identification Method
    items = []
    for value, meaning in codes:
        item = Dataset()
        item[0x00080100] = _elem(0x00080100, "SH", value)
        item[0x00080102] = _elem(0x00080102, "SH", "DCM")
        item[0x00080104] = _elem(0x00080104, "LO", meaning)
        items.append(item)
    out[0x00120064] = _elem(0x00120064, "SQ", Sequence(items))
    modified = "MODIFIED" if profile.retain_longitudinal_modified_dates else "REMOVED"
    out[0x00280303] = _elem(0x00280303, "CS", modified)
    if facemask_applied:
        out[0x00280302] = _elem(0x00280302, "CS", "NO")  # Recognizable Visual Features


def _file_meta(src: Dataset, out: Dataset, key: bytes, retain_uids: bool) -> None:
    """A fresh file meta group: no source AE titles or private information survive."""
    old = getattr(src, "file_meta", None)
    meta = FileMetaDataset()
    meta[0x00020001] = _elem(0x00020001, "OB", b"\x00\x01")
    sop_class = old.get(0x00020002) if old is not None else None
    if sop_class is None or not sop_class.value:
        sop_class = src.get(0x00080016)
    if sop_class is not None and sop_class.value:
        meta[0x00020002] = _elem(0x00020002, "UI", sop_class.value)
    if _SOP_INSTANCE_UID in out:
        meta[0x00020003] = _elem(0x00020003, "UI", out[_SOP_INSTANCE_UID].value)
    elif old is not None and 0x00020003 in old:
        original = str(old[0x00020003].value)
        new = original if retain_uids else pseudonym.pseudo_uid(key, original)
        meta[0x00020003] = _elem(0x00020003, "UI", new)
    if old is not None and 0x00020010 in old:
        meta[0x00020010] = _elem(0x00020010, "UI", old[0x00020010].value)
    meta[0x00020012] = _elem(0x00020012, "UI", PYDICOM_IMPLEMENTATION_UID)
    meta[0x00020013] = _elem(0x00020013, "SH", "DEFACEGATE_01")
    out.file_meta = meta


def _run(
    ds: Dataset, profile: Profile, facemask_applied: bool, trace: bool
) -> tuple[Dataset, list[Decision]]:
    if _text(ds, 0x00280301).upper() == "YES":  # Burned In Annotation
        raise DeidentificationError(
            "BurnedInAnnotation is YES: burned-in text cannot be removed, instance refused"
        )
    run = _Run(profile, load_table(), patient_key(ds), trace)
    out = run.dataset(ds, strict=False, path="")
    for tag in _ADDED_BY_US:
        # An input's own Recognizable Visual Features stays true unless we defaced the image.
        if tag in out and (facemask_applied or tag != 0x00280302):
            del out[tag]
    _record_method(out, profile, facemask_applied)
    _file_meta(ds, out, profile.key, profile.retain_uids)
    out.set_original_encoding(
        ds.original_encoding[0], ds.original_encoding[1], ds.original_character_set
    )
    decisions = run.decisions or []
    for tag in sorted(_ADDED_BY_US):
        if tag in out:
            decisions.append(
                Decision(
                    _tag_str(tag),
                    tag,
                    keyword_for_tag(tag),
                    "added",
                    Effect.ADDED,
                    _describe_value(out[tag].value) if out[tag].VR != "SQ" else "codes",
                )
            )
    return out, decisions


def deidentify(ds: Dataset, profile: Profile, *, facemask_applied: bool) -> Dataset:
    """Return a de-identified copy of ``ds`` (PS3.15 E.1-1 Basic Profile + ``profile`` options).

    ``facemask_applied`` records the Clean Recognizable Visual Features option (113102) and
    Recognizable Visual Features = NO. Raises :class:`DeidentificationError` when the instance
    must not be forwarded (Burned In Annotation = YES).
    """
    return _run(ds, profile, facemask_applied, trace=False)[0]


def explain(ds: Dataset, profile: Profile, *, facemask_applied: bool = False) -> list[Decision]:
    """Every decision :func:`deidentify` takes on ``ds``, values masked (for the dry run)."""
    return _run(ds, profile, facemask_applied, trace=True)[1]
