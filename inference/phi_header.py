"""A CT header template full of planted, distinct PHI — for the phantom's ``--phi`` and tests.

Every planted value is a string that should never survive de-identification (PS3.15 Annex E):
names, IDs, dates, times, addresses, device identity, free text, UIDs of referenced objects,
private tags and PHI nested inside public and private sequences. :func:`phi_header` returns the
template and the list of those strings so a test can sweep the output bytes for each of them.

The template carries no Study/Series/SOP/Frame of Reference UIDs and no image attributes:
:func:`inference.dicomgen.make_ct_series` adds those per instance. File meta is not part of the
template either (``make_ct_series`` builds its own); tests plant file meta PHI themselves.
"""

from __future__ import annotations

import random

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage

# Plausible but fictional building blocks; the seed picks among them and appends unique digits,
# so every planted string is distinct within one header and unlikely to occur by chance.
_FAMILY = (
    "Harrington",
    "Okonkwo",
    "Lindqvist",
    "Castellano",
    "Whitfield",
    "Brennagh",
    "Moravec",
    "Thorvaldsen",
    "Abernathy",
    "Kowalczyk",
    "Delacroix",
    "Fairbairn",
    "Quintero",
    "Ashworth",
    "Vasquez-Lyle",
    "Pemberton",
    "Okafor",
    "Reinholt",
    "Stavros",
    "Mbatha",
)
_GIVEN = (
    "Eleanor",
    "Tobias",
    "Marguerite",
    "Ingrid",
    "Desmond",
    "Priyanka",
    "Anselm",
    "Rosalind",
    "Leopold",
    "Signe",
    "Casimir",
    "Henrietta",
    "Ambrose",
    "Wilhelmina",
    "Florian",
    "Odette",
)
_STREETS = ("Larkspur Avenue", "Quarry Hill Road", "Pembroke Lane", "Alder Crescent")
_TOWNS = ("Fairview Heights", "Millbrook", "East Calloway", "Ravensworth")


def _uid(rng: random.Random) -> str:
    return "1.2.826.0.1.3680043.9.7777." + ".".join(str(rng.randint(1, 99999)) for _ in range(3))


def phi_header(seed: int) -> tuple[Dataset, list[str]]:
    """Return ``(header, planted)``: a CT header template and every PHI string planted in it."""
    rng = random.Random(seed)
    planted: list[str] = []
    families = rng.sample(_FAMILY, 14)
    givens = rng.sample(_GIVEN, 14)
    tag = f"{rng.randint(100, 999)}"

    def name(i: int) -> str:
        value = f"{families[i]}{tag}^{givens[i]}"
        planted.extend((value, f"{families[i]}{tag}"))
        return value

    def text(value: str) -> str:
        planted.append(value)
        return value

    def digits(prefix: str, n: int) -> str:
        return text(prefix + "".join(str(rng.randint(0, 9)) for _ in range(n)))

    year = rng.randint(2015, 2024)
    month = rng.randint(1, 12)
    day = rng.randint(1, 19)

    def date(offset_days: int = 0) -> str:
        return text(f"{year:04d}{month:02d}{day + offset_days:02d}")

    def time(hour: int) -> str:
        minute, second, frac = rng.randint(10, 59), rng.randint(10, 59), rng.randint(1, 999999)
        return text(f"{hour:02d}{minute:02d}{second:02d}.{frac:06d}")

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage
    # Patient
    ds.PatientName = name(0)
    ds.PatientID = digits("MRN", 8)
    ds.IssuerOfPatientID = text(f"St Brigid Registry {tag}")
    ds.PatientBirthDate = text(
        f"{rng.randint(1930, 1979)}{rng.randint(1, 12):02d}{rng.randint(10, 28):02d}"
    )
    ds.PatientBirthTime = time(4)
    ds.PatientSex = "F"
    ds.PatientAge = text(f"{rng.randint(41, 89):03d}Y")
    ds.PatientSize = 1.68
    ds.PatientWeight = 71.5
    ds.OtherPatientIDs = digits("ALTID", 7)
    ds.OtherPatientNames = name(1)
    ds.PatientMotherBirthName = name(2)
    ds.PatientAddress = text(
        f"{rng.randint(100, 9999)} {rng.choice(_STREETS)}, {rng.choice(_TOWNS)}"
    )
    ds.PatientTelephoneNumbers = digits("+44 161 ", 7)
    ds.Occupation = text(f"Lampwright{tag}")
    ds.EthnicGroup = text(f"Ethnic{tag}")
    ds.AdditionalPatientHistory = text(f"History of stroke {tag}, treated by Dr {families[3]}{tag}")
    ds.PatientComments = text(
        f"Lives with daughter {givens[4]} {families[4]}{tag}, call before visit"
    )
    ds.MedicalAlerts = text(f"Pacemaker model PX{tag}")
    ds.Allergies = text(f"Penicillin allergy noted {tag}")
    ds.AdmissionID = digits("ADM", 6)
    other = Dataset()
    other.PatientID = digits("OPID", 7)
    other.IssuerOfPatientID = text(f"County Hospital {tag}")
    other.TypeOfPatientID = "TEXT"
    ds.OtherPatientIDsSequence = Sequence([other])
    # Study / series / instance dates and times (all distinct)
    ds.StudyDate = date(0)
    ds.StudyTime = time(8)
    ds.SeriesDate = date(1)
    ds.SeriesTime = time(9)
    ds.AcquisitionDate = date(2)
    ds.AcquisitionTime = time(10)
    ds.ContentDate = date(3)
    ds.ContentTime = time(11)
    ds.InstanceCreationDate = date(4)
    ds.InstanceCreationTime = time(12)
    ds.AcquisitionDateTime = text(
        f"{year:04d}{month:02d}{day + 5:02d}{rng.randint(13, 17):02d}2233.000000"
    )
    ds.TimezoneOffsetFromUTC = "+0100"
    ds.DateOfLastCalibration = date(6)
    ds.TimeOfLastCalibration = time(7)
    ds.PerformedProcedureStepStartDate = date(7)
    ds.PerformedProcedureStepStartTime = time(13)
    ds.PerformedProcedureStepID = digits("PPS", 6)
    ds.PerformedProcedureStepDescription = text(f"CTA neck for {families[5]}{tag}")
    ds.AccessionNumber = digits("ACC", 9)
    ds.StudyID = digits("SID", 5)
    ds.StudyDescription = text(f"CTA head neck {families[6]}{tag}")
    ds.SeriesDescription = text(f"Arterial phase {givens[7]}{tag}")
    ds.ProtocolName = text(f"Protocol of Dr {families[7]}{tag}")
    ds.ImageComments = text(f"Reviewed by {givens[8]} {families[8]}{tag}")
    # Institution, people, device
    ds.InstitutionName = text(f"St Brigid Memorial Hospital {tag}")
    ds.InstitutionAddress = text(
        f"{rng.randint(10, 99)} Infirmary Road, {rng.choice(_TOWNS)} {tag}"
    )
    ds.InstitutionalDepartmentName = text(f"Neuroradiology Wing {tag}")
    ds.ReferringPhysicianName = name(9)
    ds.ReferringPhysicianAddress = text(f"{rng.randint(1, 99)} Harley Mews {tag}")
    ds.ReferringPhysicianTelephoneNumbers = digits("+44 20 ", 8)
    ds.PerformingPhysicianName = name(10)
    ds.NameOfPhysiciansReadingStudy = name(11)
    ds.PhysiciansOfRecord = name(12)
    ds.RequestingPhysician = name(13)
    ds.OperatorsName = name(5)
    ds.RequestingService = text(f"Stroke Unit Ward {tag}")
    ds.Manufacturer = "ACME Medical"
    ds.ManufacturerModelName = "Tomo 9000"
    ds.DeviceSerialNumber = digits("SN", 10)
    ds.StationName = text(f"CTSTN{tag}")
    ds.PerformedStationAETitle = text(f"BRIGIDCT{tag}")
    ds.BodyPartExamined = "HEAD"
    ds.ContrastBolusAgent = text(f"Iomeprol lot {tag}")
    # Nested: request attributes with IDs, descriptions and an accession number
    req = Dataset()
    req.RequestedProcedureID = digits("RP", 7)
    req.ScheduledProcedureStepID = digits("SPS", 7)
    req.RequestedProcedureDescription = text(f"CTA request by {families[13]}{tag} urgent")
    req.ReasonForTheRequestedProcedure = text(f"Suspected dissection {givens[2]}{tag}")
    req.AccessionNumber = digits("RACC", 8)
    ds.RequestAttributesSequence = Sequence([req])
    # Nested: referenced study and performed procedure step (UIDs → must be replaced)
    ref = Dataset()
    ref.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    ref.ReferencedSOPInstanceUID = text(_uid(rng))
    ds.ReferencedStudySequence = Sequence([ref])
    pps = Dataset()
    pps.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.3"
    pps.ReferencedSOPInstanceUID = text(_uid(rng))
    ds.ReferencedPerformedProcedureStepSequence = Sequence([pps])
    # Nested two levels deep: a code sequence item holding an operator identification
    op = Dataset()
    person = Dataset()
    person.CodeValue = digits("EMP", 6)
    person.CodingSchemeDesignator = "L"
    person.CodeMeaning = text(f"Badge of {givens[5]} {families[5]}{tag}")
    op.PersonIdentificationCodeSequence = Sequence([person])
    op.InstitutionName = text(f"Radiology Partners {tag} LLP")
    ds.OperatorIdentificationSequence = Sequence([op])
    # Private block with PHI, including a private sequence and a private tag inside it
    block = ds.private_block(0x0009, f"DGPHI {tag}", create=True)
    planted.append(f"DGPHI {tag}")
    block.add_new(0x10, "LO", text(f"{families[0]}{tag} private copy"))
    block.add_new(0x11, "DA", date(8))
    item = Dataset()
    item.PatientName = name(6)
    item.PatientID = digits("PMRN", 8)
    item.StudyDate = date(9)
    inner = item.private_block(0x0011, f"DGPHI INNER {tag}", create=True)
    planted.append(f"DGPHI INNER {tag}")
    inner.add_new(0x01, "LO", text(f"Inner note {givens[6]}{tag}"))
    block.add_new(0x12, "SQ", Sequence([item]))
    # A private element inside a public sequence item
    ref_block = req.private_block(0x0019, f"DGPHI REQ {tag}", create=True)
    planted.append(f"DGPHI REQ {tag}")
    ref_block.add_new(0x01, "LO", text(f"Porter {givens[3]}{tag}"))
    # Deduplicate while keeping order (a name component can repeat the family stem).
    return ds, list(dict.fromkeys(planted))
