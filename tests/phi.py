"""Synthetic DICOMs (and PNG/JPEG files) full of distinctive PHI, and a scanner that hunts for it.

``make_phi_dicoms(root, n)`` writes ``n`` valid CT DICOMs in which every attribute of the DICOM PS3.15
Annex E Basic Application Level Confidentiality Profile (Table E.1-1) that pydicom's dictionary knows holds a
unique, distinctive value: nested in sequence items too, plus private tags and PHI-bearing folder and file
names. It returns the planted strings; ``scan_for_phi`` then finds any of them in any byte of a folder tree
(raw, case-folded, UTF-16, URL-quoted or path-sanitised, and inside JSON, Parquet cells and PNG text chunks).

Later PHI tests extend this module (deeper sequences, more outputs), so the generator is kept independent of
medvae: it needs only pydicom, numpy, Pillow and pyarrow.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import re
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np


class AnnexEAttribute(NamedTuple):
    """One row of PS3.15 Table E.1-1 with a Basic Profile action."""

    group: int
    element: int
    action: str  # the "Basic Prof." column: D, Z, X, U, Z/D, X/Z, X/D, X/Z/D, X/Z/U*
    keyword: str  # pydicom's keyword for the tag

    @property
    def tag(self) -> int:
        return (self.group << 16) | self.element


# PS3.15 Annex E, Table E.1-1 "Application Level Confidentiality Profile Attributes": every attribute with a
# Basic Profile action, in the table's (alphabetical by name) order; 459 tagged rows.
# Source: innolitics/dicom-standard, standard/confidentiality_profile_attributes.json
# (commit 0d01bf11dfc1d0b73b6df85bbf6e1764d3c558a3), which is parsed from the published standard; an older
# grouping of the same table is KitwareMedical/dicom-anonymizer dicomanonymizer/dicomfields.py.
# Rows that are not single tags: "Private attributes (GGGG,EEEE) where GGGG is odd" (action X) is not listed
# here but planted by _add_private_phi(); the repeating groups "Curve Data (50xx,xxxx)" and "Overlay
# Comments/Data (60xx,4000/3000)" are listed with their first group, 0x5000 and 0x6000.
# The group 0000 rows cannot be written to a file (see NOT_PLANTABLE_IN_FILES).
ANNEX_E_BASIC_PROFILE: tuple[AnnexEAttribute, ...] = tuple(
    AnnexEAttribute(*row)
    for row in (
        (0x0008, 0x0050, "Z", "AccessionNumber"),
        (0x0018, 0x4000, "X", "AcquisitionComments"),
        (0x0040, 0x0555, "X/Z", "AcquisitionContextSequence"),
        (0x0008, 0x0022, "X/Z", "AcquisitionDate"),
        (0x0008, 0x002A, "X/Z/D", "AcquisitionDateTime"),
        (0x0018, 0x1400, "X/D", "AcquisitionDeviceProcessingDescription"),
        (0x0018, 0x11BB, "D", "AcquisitionFieldOfViewLabel"),
        (0x0018, 0x9424, "X", "AcquisitionProtocolDescription"),
        (0x0008, 0x0032, "X/Z", "AcquisitionTime"),
        (0x0040, 0x4035, "X", "ActualHumanPerformersSequence"),
        (0x0010, 0x21B0, "X", "AdditionalPatientHistory"),
        (0x0040, 0xA353, "X", "AddressTrial"),
        (0x0038, 0x0010, "X", "AdmissionID"),
        (0x0038, 0x0020, "X", "AdmittingDate"),
        (0x0008, 0x1084, "X", "AdmittingDiagnosesCodeSequence"),
        (0x0008, 0x1080, "X", "AdmittingDiagnosesDescription"),
        (0x0038, 0x0021, "X", "AdmittingTime"),
        (0x0000, 0x1000, "X", "AffectedSOPInstanceUID"),
        (0x0010, 0x2110, "X", "Allergies"),
        (0x4000, 0x0010, "X", "Arbitrary"),
        (0x0040, 0xA078, "X", "AuthorObserverSequence"),
        (0x2200, 0x0005, "X/Z", "BarcodeValue"),
        (0x300A, 0x00C3, "X", "BeamDescription"),
        (0x300A, 0x00DD, "X", "BolusDescription"),
        (0x0010, 0x1081, "X", "BranchOfService"),
        (0x0016, 0x004D, "X", "CameraOwnerName"),
        (0x0018, 0x1007, "X", "CassetteID"),
        (0x0012, 0x0060, "Z", "ClinicalTrialCoordinatingCenterName"),
        (0x0012, 0x0082, "X", "ClinicalTrialProtocolEthicsCommitteeApprovalNumber"),
        (0x0012, 0x0081, "D", "ClinicalTrialProtocolEthicsCommitteeName"),
        (0x0012, 0x0020, "D", "ClinicalTrialProtocolID"),
        (0x0012, 0x0021, "Z", "ClinicalTrialProtocolName"),
        (0x0012, 0x0072, "X", "ClinicalTrialSeriesDescription"),
        (0x0012, 0x0071, "X", "ClinicalTrialSeriesID"),
        (0x0012, 0x0030, "Z", "ClinicalTrialSiteID"),
        (0x0012, 0x0031, "Z", "ClinicalTrialSiteName"),
        (0x0012, 0x0010, "D", "ClinicalTrialSponsorName"),
        (0x0012, 0x0040, "D", "ClinicalTrialSubjectID"),
        (0x0012, 0x0042, "D", "ClinicalTrialSubjectReadingID"),
        (0x0012, 0x0051, "X", "ClinicalTrialTimePointDescription"),
        (0x0012, 0x0050, "Z", "ClinicalTrialTimePointID"),
        (0x0040, 0x0310, "X", "CommentsOnRadiationDose"),
        (0x0040, 0x0280, "X", "CommentsOnThePerformedProcedureStep"),
        (0x300A, 0x02EB, "X", "CompensatorDescription"),
        (0x0020, 0x9161, "U", "ConcatenationUID"),
        (0x3010, 0x000F, "Z", "ConceptualVolumeCombinationDescription"),
        (0x3010, 0x0017, "Z", "ConceptualVolumeDescription"),
        (0x3010, 0x0006, "U", "ConceptualVolumeUID"),
        (0x0040, 0x3001, "X", "ConfidentialityConstraintOnPatientDataDescription"),
        (0x3010, 0x0013, "U", "ConstituentConceptualVolumeUID"),
        (0x0008, 0x009C, "Z", "ConsultingPhysicianName"),
        (0x0008, 0x009D, "X", "ConsultingPhysicianIdentificationSequence"),
        (0x0050, 0x001B, "X", "ContainerComponentID"),
        (0x0040, 0x051A, "X", "ContainerDescription"),
        (0x0040, 0x0512, "D", "ContainerIdentifier"),
        (0x0070, 0x0086, "X", "ContentCreatorIdentificationCodeSequence"),
        (0x0070, 0x0084, "Z/D", "ContentCreatorName"),
        (0x0008, 0x0023, "Z/D", "ContentDate"),
        (0x0040, 0xA730, "D", "ContentSequence"),
        (0x0008, 0x0033, "Z/D", "ContentTime"),
        (0x0018, 0x0010, "Z/D", "ContrastBolusAgent"),
        (0x0018, 0xA003, "X", "ContributionDescription"),
        (0x0010, 0x2150, "X", "CountryOfResidence"),
        (0x0040, 0xA307, "X", "CurrentObserverTrial"),
        (0x0038, 0x0300, "X", "CurrentPatientLocation"),
        (0x5000, 0x3000, "X", "CurveData"),
        (0x0008, 0x0025, "X", "CurveDate"),
        (0x0008, 0x0035, "X", "CurveTime"),
        (0x0040, 0xA07C, "X", "CustodialOrganizationSequence"),
        (0xFFFC, 0xFFFC, "X", "DataSetTrailingPadding"),
        (0x0018, 0x937F, "X", "DecompositionDescription"),
        (0x0008, 0x2111, "X", "DerivationDescription"),
        (0x0018, 0x700A, "X/D", "DetectorID"),
        (0x3010, 0x001B, "Z", "DeviceAlternateIdentifier"),
        (0x0050, 0x0020, "X", "DeviceDescription"),
        (0x3010, 0x002D, "D", "DeviceLabel"),
        (0x0018, 0x1000, "X/Z/D", "DeviceSerialNumber"),
        (0x0016, 0x004B, "X", "DeviceSettingDescription"),
        (0x0018, 0x1002, "U", "DeviceUID"),
        (0xFFFA, 0xFFFA, "X", "DigitalSignaturesSequence"),
        (0x0400, 0x0100, "U", "DigitalSignatureUID"),
        (0x0020, 0x9164, "U", "DimensionOrganizationUID"),
        (0x0038, 0x0040, "X", "DischargeDiagnosisDescription"),
        (0x4008, 0x011A, "X", "DistributionAddress"),
        (0x4008, 0x0119, "X", "DistributionName"),
        (0x300A, 0x0016, "X", "DoseReferenceDescription"),
        (0x300A, 0x0013, "U", "DoseReferenceUID"),
        (0x3010, 0x006E, "U", "DosimetricObjectiveUID"),
        (0x0018, 0x9517, "X/D", "EndAcquisitionDateTime"),
        (0x3010, 0x0037, "X", "EntityDescription"),
        (0x3010, 0x0035, "D", "EntityLabel"),
        (0x3010, 0x0038, "D", "EntityLongLabel"),
        (0x3010, 0x0036, "X", "EntityName"),
        (0x300A, 0x0676, "X", "EquipmentFrameOfReferenceDescription"),
        (0x0010, 0x2160, "X", "EthnicGroup"),
        (0x0040, 0x4011, "X", "ExpectedCompletionDateTime"),
        (0x0008, 0x0058, "U", "FailedSOPInstanceUIDList"),
        (0x0070, 0x031A, "U", "FiducialUID"),
        (0x0040, 0x2017, "Z", "FillerOrderNumberImagingServiceRequest"),
        (0x3008, 0x0054, "X/D", "FirstTreatmentDate"),
        (0x300A, 0x0196, "X", "FixationDeviceDescription"),
        (0x0034, 0x0002, "D", "FlowIdentifier"),
        (0x0034, 0x0001, "D", "FlowIdentifierSequence"),
        (0x3010, 0x007F, "Z", "FractionationNotes"),
        (0x300A, 0x0072, "X", "FractionGroupDescription"),
        (0x0020, 0x9158, "X", "FrameComments"),
        (0x0020, 0x0052, "U", "FrameOfReferenceUID"),
        (0x0034, 0x0007, "D", "FrameOriginTimestamp"),
        (0x0018, 0x1008, "X", "GantryID"),
        (0x0018, 0x1005, "X", "GeneratorID"),
        (0x0016, 0x0076, "X", "GPSAltitude"),
        (0x0016, 0x0075, "X", "GPSAltitudeRef"),
        (0x0016, 0x008C, "X", "GPSAreaInformation"),
        (0x0016, 0x008D, "X", "GPSDateStamp"),
        (0x0016, 0x0088, "X", "GPSDestBearing"),
        (0x0016, 0x0087, "X", "GPSDestBearingRef"),
        (0x0016, 0x008A, "X", "GPSDestDistance"),
        (0x0016, 0x0089, "X", "GPSDestDistanceRef"),
        (0x0016, 0x0084, "X", "GPSDestLatitude"),
        (0x0016, 0x0083, "X", "GPSDestLatitudeRef"),
        (0x0016, 0x0086, "X", "GPSDestLongitude"),
        (0x0016, 0x0085, "X", "GPSDestLongitudeRef"),
        (0x0016, 0x008E, "X", "GPSDifferential"),
        (0x0016, 0x007B, "X", "GPSDOP"),
        (0x0016, 0x0081, "X", "GPSImgDirection"),
        (0x0016, 0x0080, "X", "GPSImgDirectionRef"),
        (0x0016, 0x0072, "X", "GPSLatitude"),
        (0x0016, 0x0071, "X", "GPSLatitudeRef"),
        (0x0016, 0x0074, "X", "GPSLongitude"),
        (0x0016, 0x0073, "X", "GPSLongitudeRef"),
        (0x0016, 0x0082, "X", "GPSMapDatum"),
        (0x0016, 0x007A, "X", "GPSMeasureMode"),
        (0x0016, 0x008B, "X", "GPSProcessingMethod"),
        (0x0016, 0x0078, "X", "GPSSatellites"),
        (0x0016, 0x007D, "X", "GPSSpeed"),
        (0x0016, 0x007C, "X", "GPSSpeedRef"),
        (0x0016, 0x0079, "X", "GPSStatus"),
        (0x0016, 0x0077, "X", "GPSTimeStamp"),
        (0x0016, 0x007F, "X", "GPSTrack"),
        (0x0016, 0x007E, "X", "GPSTrackRef"),
        (0x0016, 0x0070, "X", "GPSVersionID"),
        (0x0070, 0x0001, "D", "GraphicAnnotationSequence"),
        (0x0040, 0x4037, "X", "HumanPerformerName"),
        (0x0040, 0x4036, "X", "HumanPerformerOrganization"),
        (0x0088, 0x0200, "X", "IconImageSequence"),
        (0x0008, 0x4000, "X", "IdentifyingComments"),
        (0x0020, 0x4000, "X", "ImageComments"),
        (0x0028, 0x4000, "X", "ImagePresentationComments"),
        (0x0040, 0x2400, "X", "ImagingServiceRequestComments"),
        (0x003A, 0x0314, "D", "ImpedanceMeasurementDateTime"),
        (0x4008, 0x0300, "X", "Impressions"),
        (0x0008, 0x0015, "X", "InstanceCoercionDateTime"),
        (0x0008, 0x0014, "U", "InstanceCreatorUID"),
        (0x0400, 0x0600, "X", "InstanceOriginStatus"),
        (0x0008, 0x0081, "X", "InstitutionAddress"),
        (0x0008, 0x1040, "X", "InstitutionalDepartmentName"),
        (0x0008, 0x1041, "X", "InstitutionalDepartmentTypeCodeSequence"),
        (0x0008, 0x0082, "X/Z/D", "InstitutionCodeSequence"),
        (0x0008, 0x0080, "X/Z/D", "InstitutionName"),
        (0x0010, 0x1050, "X", "InsurancePlanIdentification"),
        (0x3010, 0x004D, "X/D", "IntendedPhaseEndDate"),
        (0x3010, 0x004C, "X/D", "IntendedPhaseStartDate"),
        (0x0040, 0x1011, "X", "IntendedRecipientsOfResultsIdentificationSequence"),
        (0x300A, 0x0741, "D", "InterlockDateTime"),
        (0x300A, 0x0742, "D", "InterlockDescription"),
        (0x300A, 0x0783, "D", "InterlockOriginDescription"),
        (0x4008, 0x0111, "X", "InterpretationApproverSequence"),
        (0x4008, 0x010C, "X", "InterpretationAuthor"),
        (0x4008, 0x0115, "X", "InterpretationDiagnosisDescription"),
        (0x4008, 0x0202, "X", "InterpretationIDIssuer"),
        (0x4008, 0x0102, "X", "InterpretationRecorder"),
        (0x4008, 0x010B, "X", "InterpretationText"),
        (0x4008, 0x010A, "X", "InterpretationTranscriber"),
        (0x0008, 0x3010, "U", "IrradiationEventUID"),
        (0x0038, 0x0011, "X", "IssuerOfAdmissionID"),
        (0x0038, 0x0014, "X", "IssuerOfAdmissionIDSequence"),
        (0x0010, 0x0021, "X", "IssuerOfPatientID"),
        (0x0038, 0x0061, "X", "IssuerOfServiceEpisodeID"),
        (0x0038, 0x0064, "X", "IssuerOfServiceEpisodeIDSequence"),
        (0x0040, 0x0513, "Z", "IssuerOfTheContainerIdentifierSequence"),
        (0x0040, 0x0562, "Z", "IssuerOfTheSpecimenIdentifierSequence"),
        (0x2200, 0x0002, "X/Z", "LabelText"),
        (0x0028, 0x1214, "U", "LargePaletteColorLookupTableUID"),
        (0x0010, 0x21D0, "X", "LastMenstrualDate"),
        (0x0016, 0x004F, "X", "LensMake"),
        (0x0016, 0x0050, "X", "LensModel"),
        (0x0016, 0x0051, "X", "LensSerialNumber"),
        (0x0016, 0x004E, "X", "LensSpecification"),
        (0x0050, 0x0021, "X", "LongDeviceDescription"),
        (0x0400, 0x0404, "X", "MAC"),
        (0x0016, 0x002B, "X", "MakerNote"),
        (0x0018, 0x100B, "U", "ManufacturerDeviceClassUID"),
        (0x3010, 0x0043, "Z", "ManufacturerDeviceIdentifier"),
        (0x0002, 0x0003, "U", "MediaStorageSOPInstanceUID"),
        (0x0010, 0x2000, "X", "MedicalAlerts"),
        (0x0010, 0x1090, "X", "MedicalRecordLocator"),
        (0x0010, 0x1080, "X", "MilitaryRank"),
        (0x0400, 0x0550, "X", "ModifiedAttributesSequence"),
        (0x0020, 0x3406, "X", "ModifiedImageDescription"),
        (0x0020, 0x3401, "X", "ModifyingDeviceID"),
        (0x3008, 0x0056, "X/D", "MostRecentTreatmentDate"),
        (0x0018, 0x937B, "X", "MultienergyAcquisitionDescription"),
        (0x003A, 0x0310, "U", "MultiplexGroupUID"),
        (0x0008, 0x1060, "X", "NameOfPhysiciansReadingStudy"),
        (0x0040, 0x1010, "X", "NamesOfIntendedRecipientsOfResults"),
        (0x0400, 0x0551, "X", "NonconformingModifiedAttributesSequence"),
        (0x0400, 0x0552, "X", "NonconformingDataElementValue"),
        (0x0040, 0xA192, "X", "ObservationDateTrial"),
        (0x0040, 0xA402, "U", "ObservationSubjectUIDTrial"),
        (0x0040, 0xA193, "X", "ObservationTimeTrial"),
        (0x0040, 0xA171, "U", "ObservationUID"),
        (0x0010, 0x2180, "X", "Occupation"),
        (0x0008, 0x1072, "X/D", "OperatorIdentificationSequence"),
        (0x0008, 0x1070, "X/Z/D", "OperatorsName"),
        (0x0040, 0x2010, "X", "OrderCallbackPhoneNumber"),
        (0x0040, 0x2011, "X", "OrderCallbackTelecomInformation"),
        (0x0040, 0x2008, "X", "OrderEnteredBy"),
        (0x0040, 0x2009, "X", "OrderEntererLocation"),
        (0x0400, 0x0561, "X", "OriginalAttributesSequence"),
        (0x0010, 0x1000, "X", "OtherPatientIDs"),
        (0x0010, 0x1002, "X", "OtherPatientIDsSequence"),
        (0x0010, 0x1001, "X", "OtherPatientNames"),
        (0x6000, 0x4000, "X", "OverlayComments"),
        (0x6000, 0x3000, "X", "OverlayData"),
        (0x0008, 0x0024, "X", "OverlayDate"),
        (0x0008, 0x0034, "X", "OverlayTime"),
        (0x300A, 0x0760, "D", "OverrideDateTime"),
        (0x0028, 0x1199, "U", "PaletteColorLookupTableUID"),
        (0x0040, 0xA07A, "X", "ParticipantSequence"),
        (0x0010, 0x1040, "X", "PatientAddress"),
        (0x0010, 0x1010, "X", "PatientAge"),
        (0x0010, 0x0030, "Z", "PatientBirthDate"),
        (0x0010, 0x1005, "X", "PatientBirthName"),
        (0x0010, 0x0032, "X", "PatientBirthTime"),
        (0x0038, 0x0400, "X", "PatientInstitutionResidence"),
        (0x0010, 0x0050, "X", "PatientInsurancePlanCodeSequence"),
        (0x0010, 0x1060, "X", "PatientMotherBirthName"),
        (0x0010, 0x0010, "Z", "PatientName"),
        (0x0010, 0x0101, "X", "PatientPrimaryLanguageCodeSequence"),
        (0x0010, 0x0102, "X", "PatientPrimaryLanguageModifierCodeSequence"),
        (0x0010, 0x21F0, "X", "PatientReligiousPreference"),
        (0x0010, 0x0040, "Z", "PatientSex"),
        (0x0010, 0x2203, "X/Z", "PatientSexNeutered"),
        (0x0010, 0x1020, "X", "PatientSize"),
        (0x0010, 0x2155, "X", "PatientTelecomInformation"),
        (0x0010, 0x2154, "X", "PatientTelephoneNumbers"),
        (0x0010, 0x1030, "X", "PatientWeight"),
        (0x0010, 0x4000, "X", "PatientComments"),
        (0x0010, 0x0020, "Z", "PatientID"),
        (0x300A, 0x0650, "U", "PatientSetupUID"),
        (0x0038, 0x0500, "X", "PatientState"),
        (0x0040, 0x1004, "X", "PatientTransportArrangements"),
        (0x0040, 0x0243, "X", "PerformedLocation"),
        (0x0040, 0x0254, "X", "PerformedProcedureStepDescription"),
        (0x0040, 0x0250, "X", "PerformedProcedureStepEndDate"),
        (0x0040, 0x4051, "X", "PerformedProcedureStepEndDateTime"),
        (0x0040, 0x0251, "X", "PerformedProcedureStepEndTime"),
        (0x0040, 0x0253, "X", "PerformedProcedureStepID"),
        (0x0040, 0x0244, "X", "PerformedProcedureStepStartDate"),
        (0x0040, 0x4050, "X", "PerformedProcedureStepStartDateTime"),
        (0x0040, 0x0245, "X", "PerformedProcedureStepStartTime"),
        (0x0040, 0x0241, "X", "PerformedStationAETitle"),
        (0x0040, 0x4030, "X", "PerformedStationGeographicLocationCodeSequence"),
        (0x0040, 0x0242, "X", "PerformedStationName"),
        (0x0040, 0x4028, "X", "PerformedStationNameCodeSequence"),
        (0x0008, 0x1050, "X", "PerformingPhysicianName"),
        (0x0008, 0x1052, "X", "PerformingPhysicianIdentificationSequence"),
        (0x0040, 0x1102, "X", "PersonAddress"),
        (0x0040, 0x1104, "X", "PersonTelecomInformation"),
        (0x0040, 0x1103, "X", "PersonTelephoneNumbers"),
        (0x0040, 0x1101, "D", "PersonIdentificationCodeSequence"),
        (0x0040, 0xA123, "D", "PersonName"),
        (0x0008, 0x1048, "X", "PhysiciansOfRecord"),
        (0x0008, 0x1049, "X", "PhysiciansOfRecordIdentificationSequence"),
        (0x0008, 0x1062, "X", "PhysiciansReadingStudyIdentificationSequence"),
        (0x4008, 0x0114, "X", "PhysicianApprovingInterpretation"),
        (0x0040, 0x2016, "Z", "PlacerOrderNumberImagingServiceRequest"),
        (0x0018, 0x1004, "X", "PlateID"),
        (0x0010, 0x21C0, "X", "PregnancyStatus"),
        (0x0040, 0x0012, "X", "PreMedication"),
        (0x300A, 0x000E, "X", "PrescriptionDescription"),
        (0x3010, 0x007B, "Z", "PrescriptionNotes"),
        (0x3010, 0x0081, "Z", "PrescriptionNotesSequence"),
        (0x0070, 0x1101, "U", "PresentationDisplayCollectionUID"),
        (0x0070, 0x1102, "U", "PresentationSequenceCollectionUID"),
        (0x3010, 0x0061, "X", "PriorTreatmentDoseDescription"),
        (0x0040, 0x4052, "X", "ProcedureStepCancellationDateTime"),
        (0x0018, 0x1030, "X/D", "ProtocolName"),
        (0x300A, 0x0619, "D", "RadiationDoseIdentificationLabel"),
        (0x300A, 0x0623, "D", "RadiationDoseInVivoMeasurementLabel"),
        (0x300A, 0x067D, "Z", "RadiationGenerationModeDescription"),
        (0x300A, 0x067C, "D", "RadiationGenerationModeLabel"),
        (0x300C, 0x0113, "X", "ReasonForOmissionDescription"),
        (0x0040, 0x100A, "X", "ReasonForRequestedProcedureCodeSequence"),
        (0x0032, 0x1030, "X", "ReasonForStudy"),
        (0x3010, 0x005C, "Z", "ReasonForSuperseding"),
        (0x0040, 0x2001, "X", "ReasonForTheImagingServiceRequest"),
        (0x0040, 0x1002, "X", "ReasonForTheRequestedProcedure"),
        (0x0032, 0x1066, "X", "ReasonForVisit"),
        (0x0032, 0x1067, "X", "ReasonForVisitCodeSequence"),
        (0x300A, 0x073A, "D", "RecordedRTControlPointDateTime"),
        (0x3010, 0x000B, "U", "ReferencedConceptualVolumeUID"),
        (0x0400, 0x0402, "X", "ReferencedDigitalSignatureSequence"),
        (0x300A, 0x0083, "U", "ReferencedDoseReferenceUID"),
        (0x3010, 0x006F, "U", "ReferencedDosimetricObjectiveUID"),
        (0x3010, 0x0031, "U", "ReferencedFiducialsUID"),
        (0x3006, 0x0024, "U", "ReferencedFrameOfReferenceUID"),
        (0x0040, 0x4023, "U", "ReferencedGeneralPurposeScheduledProcedureStepTransactionUID"),
        (0x0008, 0x1140, "X/Z/U*", "ReferencedImageSequence"),
        (0x0040, 0xA172, "U", "ReferencedObservationUIDTrial"),
        (0x0038, 0x0004, "X", "ReferencedPatientAliasSequence"),
        (0x0010, 0x1100, "X", "ReferencedPatientPhotoSequence"),
        (0x0008, 0x1120, "X", "ReferencedPatientSequence"),
        (0x0008, 0x1111, "X/Z/D", "ReferencedPerformedProcedureStepSequence"),
        (0x0400, 0x0403, "X", "ReferencedSOPInstanceMACSequence"),
        (0x0008, 0x1155, "U", "ReferencedSOPInstanceUID"),
        (0x0004, 0x1511, "U", "ReferencedSOPInstanceUIDInFile"),
        (0x0008, 0x1110, "X/Z", "ReferencedStudySequence"),
        (0x0008, 0x0092, "X", "ReferringPhysicianAddress"),
        (0x0008, 0x0090, "Z", "ReferringPhysicianName"),
        (0x0008, 0x0094, "X", "ReferringPhysicianTelephoneNumbers"),
        (0x0008, 0x0096, "X", "ReferringPhysicianIdentificationSequence"),
        (0x0010, 0x2152, "X", "RegionOfResidence"),
        (0x3006, 0x00C2, "U", "RelatedFrameOfReferenceUID"),
        (0x0040, 0x0275, "X", "RequestAttributesSequence"),
        (0x0032, 0x1070, "X", "RequestedContrastAgent"),
        (0x0040, 0x1400, "X", "RequestedProcedureComments"),
        (0x0032, 0x1060, "X/Z", "RequestedProcedureDescription"),
        (0x0040, 0x1001, "X", "RequestedProcedureID"),
        (0x0040, 0x1005, "X", "RequestedProcedureLocation"),
        (0x0018, 0x9937, "X", "RequestedSeriesDescription"),
        (0x0000, 0x1001, "U", "RequestedSOPInstanceUID"),
        (0x0032, 0x1032, "X", "RequestingPhysician"),
        (0x0032, 0x1033, "X", "RequestingService"),
        (0x0018, 0x9185, "X", "RespiratoryMotionCompensationTechniqueDescription"),
        (0x0010, 0x2299, "X", "ResponsibleOrganization"),
        (0x0010, 0x2297, "X", "ResponsiblePerson"),
        (0x4008, 0x4000, "X", "ResultsComments"),
        (0x4008, 0x0118, "X", "ResultsDistributionListSequence"),
        (0x4008, 0x0042, "X", "ResultsIDIssuer"),
        (0x300E, 0x0008, "X/Z", "ReviewerName"),
        (0x3006, 0x0028, "X", "ROIDescription"),
        (0x3006, 0x0038, "X", "ROIGenerationDescription"),
        (0x3006, 0x00A6, "Z", "ROIInterpreter"),
        (0x3006, 0x0026, "Z", "ROIName"),
        (0x3006, 0x0088, "X", "ROIObservationDescription"),
        (0x3006, 0x0085, "X", "ROIObservationLabel"),
        (0x300A, 0x0615, "Z", "RTAccessoryDeviceSlotID"),
        (0x300A, 0x0611, "Z", "RTAccessoryHolderSlotID"),
        (0x3010, 0x005A, "Z", "RTPhysicianIntentNarrative"),
        (0x300A, 0x0006, "X/D", "RTPlanDate"),
        (0x300A, 0x0004, "X", "RTPlanDescription"),
        (0x300A, 0x0002, "D", "RTPlanLabel"),
        (0x300A, 0x0003, "X", "RTPlanName"),
        (0x300A, 0x0007, "X/D", "RTPlanTime"),
        (0x3010, 0x0054, "D", "RTPrescriptionLabel"),
        (0x300A, 0x062A, "D", "RTToleranceSetLabel"),
        (0x3010, 0x0056, "X/D", "RTTreatmentApproachLabel"),
        (0x3010, 0x003B, "U", "RTTreatmentPhaseUID"),
        (0x0040, 0x4034, "X", "ScheduledHumanPerformersSequence"),
        (0x0038, 0x001E, "X", "ScheduledPatientInstitutionResidence"),
        (0x0040, 0x0006, "X", "ScheduledPerformingPhysicianName"),
        (0x0040, 0x000B, "X", "ScheduledPerformingPhysicianIdentificationSequence"),
        (0x0040, 0x0007, "X", "ScheduledProcedureStepDescription"),
        (0x0040, 0x0004, "X", "ScheduledProcedureStepEndDate"),
        (0x0040, 0x0005, "X", "ScheduledProcedureStepEndTime"),
        (0x0040, 0x4008, "X", "ScheduledProcedureStepExpirationDateTime"),
        (0x0040, 0x0009, "X", "ScheduledProcedureStepID"),
        (0x0040, 0x0011, "X", "ScheduledProcedureStepLocation"),
        (0x0040, 0x4010, "X", "ScheduledProcedureStepModificationDateTime"),
        (0x0040, 0x0002, "X", "ScheduledProcedureStepStartDate"),
        (0x0040, 0x4005, "X", "ScheduledProcedureStepStartDateTime"),
        (0x0040, 0x0003, "X", "ScheduledProcedureStepStartTime"),
        (0x0040, 0x0001, "X", "ScheduledStationAETitle"),
        (0x0040, 0x4027, "X", "ScheduledStationGeographicLocationCodeSequence"),
        (0x0040, 0x0010, "X", "ScheduledStationName"),
        (0x0040, 0x4025, "X", "ScheduledStationNameCodeSequence"),
        (0x0032, 0x1020, "X", "ScheduledStudyLocation"),
        (0x0032, 0x1021, "X", "ScheduledStudyLocationAETitle"),
        (0x0008, 0x0021, "X/D", "SeriesDate"),
        (0x0008, 0x103E, "X", "SeriesDescription"),
        (0x0020, 0x000E, "U", "SeriesInstanceUID"),
        (0x0008, 0x0031, "X/D", "SeriesTime"),
        (0x0038, 0x0062, "X", "ServiceEpisodeDescription"),
        (0x0038, 0x0060, "X", "ServiceEpisodeID"),
        (0x300A, 0x01B2, "X", "SetupTechniqueDescription"),
        (0x300A, 0x01A6, "X", "ShieldingDeviceDescription"),
        (0x0040, 0x06FA, "X", "SlideIdentifier"),
        (0x0010, 0x21A0, "X", "SmokingStatus"),
        (0x0008, 0x0018, "U", "SOPInstanceUID"),
        (0x3010, 0x0015, "U", "SourceConceptualVolumeUID"),
        (0x0018, 0x936A, "D", "SourceEndDateTime"),
        (0x0034, 0x0005, "D", "SourceIdentifier"),
        (0x0008, 0x2112, "X/Z/U*", "SourceImageSequence"),
        (0x300A, 0x0216, "X", "SourceManufacturer"),
        (0x3008, 0x0105, "X/Z", "SourceSerialNumber"),
        (0x0018, 0x9369, "D", "SourceStartDateTime"),
        (0x0038, 0x0050, "X", "SpecialNeeds"),
        (0x0040, 0x050A, "X", "SpecimenAccessionNumber"),
        (0x0040, 0x0602, "X", "SpecimenDetailedDescription"),
        (0x0040, 0x0551, "D", "SpecimenIdentifier"),
        (0x0040, 0x0610, "Z", "SpecimenPreparationSequence"),
        (0x0040, 0x0600, "X", "SpecimenShortDescription"),
        (0x0040, 0x0554, "U", "SpecimenUID"),
        (0x0018, 0x9516, "X/D", "StartAcquisitionDateTime"),
        (0x0008, 0x1010, "X/Z/D", "StationName"),
        (0x0088, 0x0140, "U", "StorageMediaFileSetUID"),
        (0x3006, 0x0008, "Z", "StructureSetDate"),
        (0x3006, 0x0006, "X", "StructureSetDescription"),
        (0x3006, 0x0002, "D", "StructureSetLabel"),
        (0x3006, 0x0004, "X", "StructureSetName"),
        (0x3006, 0x0009, "X/D", "StructureSetTime"),
        (0x0032, 0x4000, "X", "StudyComments"),
        (0x0008, 0x0020, "Z", "StudyDate"),
        (0x0008, 0x1030, "X", "StudyDescription"),
        (0x0020, 0x0010, "Z", "StudyID"),
        (0x0032, 0x0012, "X", "StudyIDIssuer"),
        (0x0020, 0x000D, "U", "StudyInstanceUID"),
        (0x0008, 0x0030, "Z", "StudyTime"),
        (0x0020, 0x0200, "U", "SynchronizationFrameOfReferenceUID"),
        (0x0018, 0x2042, "U", "TargetUID"),
        (0x0040, 0xA354, "X", "TelephoneNumberTrial"),
        (0x0040, 0xDB0D, "U", "TemplateExtensionCreatorUID"),
        (0x0040, 0xDB0C, "U", "TemplateExtensionOrganizationUID"),
        (0x4000, 0x4000, "X", "TextComments"),
        (0x2030, 0x0020, "X", "TextString"),
        (0x0008, 0x0201, "X", "TimezoneOffsetFromUTC"),
        (0x0088, 0x0910, "X", "TopicAuthor"),
        (0x0088, 0x0912, "X", "TopicKeywords"),
        (0x0088, 0x0906, "X", "TopicSubject"),
        (0x0088, 0x0904, "X", "TopicTitle"),
        (0x0062, 0x0021, "U", "TrackingUID"),
        (0x0008, 0x1195, "U", "TransactionUID"),
        (0x0018, 0x5011, "X", "TransducerIdentificationSequence"),
        (0x3008, 0x0250, "X/D", "TreatmentDate"),
        (0x300A, 0x00B2, "X", "TreatmentMachineName"),
        (0x300A, 0x0608, "D", "TreatmentPositionGroupLabel"),
        (0x300A, 0x0609, "U", "TreatmentPositionGroupUID"),
        (0x300A, 0x0700, "U", "TreatmentSessionUID"),
        (0x3010, 0x0077, "D", "TreatmentSite"),
        (0x3010, 0x007A, "Z", "TreatmentTechniqueNotes"),
        (0x3008, 0x0251, "X/D", "TreatmentTime"),
        (0x300A, 0x0736, "D", "TreatmentToleranceViolationDateTime"),
        (0x300A, 0x0734, "D", "TreatmentToleranceViolationDescription"),
        (0x0018, 0x100A, "X", "UDISequence"),
        (0x0040, 0xA124, "U", "UID"),
        (0x0018, 0x1009, "X", "UniqueDeviceIdentifier"),
        (0x3010, 0x0033, "D", "UserContentLabel"),
        (0x3010, 0x0034, "D", "UserContentLongLabel"),
        (0x0040, 0xA352, "X", "VerbalSourceTrial"),
        (0x0040, 0xA358, "X", "VerbalSourceIdentifierCodeSequenceTrial"),
        (0x0040, 0xA088, "Z", "VerifyingObserverIdentificationCodeSequence"),
        (0x0040, 0xA075, "D", "VerifyingObserverName"),
        (0x0040, 0xA073, "D", "VerifyingObserverSequence"),
        (0x0040, 0xA027, "D", "VerifyingOrganization"),
        (0x0038, 0x4000, "X", "VisitComments"),
        (0x0018, 0x9371, "D", "XRayDetectorID"),
        (0x0018, 0x9373, "X", "XRayDetectorLabel"),
        (0x0018, 0x9367, "D", "XRaySourceID"),
    )
)

# Command Set attributes (group 0000) are DIMSE message fields: the DICOM file format forbids them in a file
# and pydicom refuses to write them, so they cannot be planted.
NOT_PLANTABLE_IN_FILES: frozenset[int] = frozenset({0x00001000, 0x00001001})
# (0002,0003) lives in the file meta group; it gets the same PHI UID as SOP Instance UID, as in real files.
MEDIA_STORAGE_SOP_INSTANCE_UID = 0x00020003

PRIVATE_CREATOR = "PHI ACME PRIVATE"
UID_ROOT = "1.2.826.0.1.3680043.99.777."

_TEXT_VRS = frozenset({"AE", "CS", "SH", "LO", "LT", "ST", "UT", "UC", "PN", "UR"})
_BYTES_VRS = frozenset({"OB", "OW", "UN", "OD", "OF", "OL", "OV"})


class _Tokens:
    """Unique, distinctive values per VR family; fixed width so no value is a prefix of another."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._text = self._date = self._time = self._uid = self._num = 0

    def text(self) -> str:  # valid for every text VR, CS included (upper case, digits, <= 16 chars)
        self._text += 1
        return f"{self.prefix}{self._text:04d}X"

    def date(self) -> str:  # rare dates from 1911 on: 19110101, 19110102, ...
        d = _dt.date(1911, 1, 1) + _dt.timedelta(days=self._date)
        self._date += 1
        return d.strftime("%Y%m%d")

    def time(self) -> str:  # 090000.773000, 090001.773001, ... (HHMMSS.FFFFFF)
        t = self._time
        self._time += 1
        return f"09{(t // 60) % 60:02d}{t % 60:02d}.773{t % 1000:03d}"

    def uid(self) -> str:
        self._uid += 1
        return f"{UID_ROOT}{10000 + self._uid}"

    def number(self) -> str:  # IS and DS
        self._num += 1
        return f"7731{self._num:04d}"


class _Planter:
    """Makes a PHI value for a VR and records each distinctive string with where it was planted."""

    def __init__(self, tokens: _Tokens, planted: dict[str, str], sequence_depth: int) -> None:
        self.tokens = tokens
        self.planted = planted
        self.sequence_depth = sequence_depth

    def record(self, value: str, origin: str) -> str:
        if value in self.planted:
            raise AssertionError(f"PHI value {value!r} planted twice ({self.planted[value]}; {origin})")
        self.planted[value] = origin
        return value

    def value(self, vr: str, origin: str, depth: int = 0) -> Any:
        from pydicom.sequence import Sequence

        vr = vr.split(" or ")[0]
        if vr in _TEXT_VRS:
            return self.record(self.tokens.text(), origin)
        if vr == "DA":
            return self.record(self.tokens.date(), origin)
        if vr == "TM":
            return self.record(self.tokens.time(), origin)
        if vr == "DT":
            return self.record(self.tokens.date() + self.tokens.time(), origin)
        if vr == "UI":
            return self.record(self.tokens.uid(), origin)
        if vr in ("IS", "DS"):
            return self.record(self.tokens.number(), origin)
        if vr in _BYTES_VRS:
            data = self.record(self.tokens.text(), origin).encode("ascii")
            return data + b"\x00" * (-len(data) % 8)  # even length, and whole OF/OL/OD/OV values
        if vr == "SQ":
            return Sequence([self.item(origin, depth + 1)])
        # Values too short or too common to search for bytewise: set, but not planted.
        if vr == "AS":
            return "077Y"
        if vr in ("US", "SS", "UL", "SL", "UV", "SV"):
            return 7731
        if vr in ("FL", "FD"):
            return 77.31
        if vr == "AT":
            return 0x00100010
        raise ValueError(f"no PHI value for VR {vr} ({origin})")

    def item(self, origin: str, depth: int) -> Any:
        """A sequence item with PHI in a code, a person name and a UID (and deeper sequences if asked)."""
        from pydicom.dataset import Dataset
        from pydicom.uid import CTImageStorage

        item = Dataset()
        item.CodeValue = self.value("SH", f"{origin} > CodeValue", depth)
        item.CodingSchemeDesignator = "99PHI"
        item.CodeMeaning = self.value("LO", f"{origin} > CodeMeaning", depth)
        item.PersonName = self.value("PN", f"{origin} > PersonName", depth)
        item.ReferencedSOPClassUID = CTImageStorage
        item.ReferencedSOPInstanceUID = self.value("UI", f"{origin} > ReferencedSOPInstanceUID", depth)
        if depth < self.sequence_depth:
            item.ContentSequence = self.value("SQ", f"{origin} > ContentSequence", depth)
        return item


def _tag_str(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _add_private_phi(ds: Any, p: _Planter, where: str) -> None:
    """Private tags (Annex E: "Private attributes", action X): a named block, a PHI-named one, an orphan."""
    block = ds.private_block(0x0009, PRIVATE_CREATOR, create=True)
    for offset, vr in enumerate(
        ("LO", "SH", "ST", "LT", "UT", "PN", "DA", "TM", "UI", "DS", "OB", "UN", "SQ")
    ):
        tag = block.get_tag(0x10 + offset)
        block.add_new(0x10 + offset, vr, p.value(vr, f"{where} private {_tag_str(tag)} {vr}"))
    # A private creator that is itself PHI (some sites put the hospital name there).
    creator = p.value("LO", f"{where} private creator (0011,0010)")
    block2 = ds.private_block(0x0011, creator, create=True)
    block2.add_new(0x01, "LO", p.value("LO", f"{where} private {_tag_str(block2.get_tag(0x01))} LO"))
    # An orphan private element with no creator, as some devices write.
    ds.add_new(0x00131010, "LO", p.value("LO", f"{where} private (0013,1010) LO without creator"))


def _ct_pixels(rng: np.random.Generator, rows: int = 80, cols: int = 96) -> np.ndarray:
    """A 12-bit CT-like gradient with noise, stored as uint16."""
    y = np.linspace(0.0, 2500.0, rows)[:, None]
    x = np.linspace(0.0, 1200.0, cols)[None, :]
    img = 300.0 + y + x + rng.normal(0.0, 40.0, (rows, cols))
    return np.clip(img, 0, 4095).astype(np.uint16)


def phi_dicom_path(root: Path, index: int) -> Path:
    """``root/PHI_DOE^JOHN_MRN<mrn>/PHI_STUDY_<date>/PHI_scan_<index>.dcm``: PHI in every path component."""
    study_date = (_dt.date(1923, 4, 17) + _dt.timedelta(days=index)).strftime("%Y%m%d")
    return (
        root / f"PHI_DOE^JOHN_MRN{12345670 + index}" / f"PHI_STUDY_{study_date}" / f"PHI_scan_{index:03d}.dcm"
    )


def _plant_path(path: Path, root: Path, planted: dict[str, str]) -> None:
    """Plant every PHI-bearing path component below ``root`` and its distinctive fragments."""
    rel = path.relative_to(root)
    for part in (*rel.parts[:-1], rel.stem):
        planted.setdefault(part, f"path component of {rel.as_posix()}")
        for frag in re.findall(r"MRN\d+|[A-Z]+\^[A-Z]+|(?<!\d)(?:19|20)\d{6}(?!\d)", part):
            planted.setdefault(frag, f"fragment of path component {part!r}")


def make_phi_dicoms_with_origins(
    root: Path, n: int = 3, *, seed: int = 0, sequence_depth: int = 1
) -> dict[str, str]:
    """Write ``n`` CT DICOMs under ``root`` with PHI in every Annex E attribute, private tags and paths.

    Args:
        root: folder to write into (created); see :func:`phi_dicom_path` for the layout.
        n: number of files; every file gets its own values.
        seed: seed for the pixel noise.
        sequence_depth: how many levels of nested sequence items carry PHI (1: one item per sequence).

    Returns:
        Every planted, bytewise-searchable PHI string mapped to where it was planted.
    """
    import pydicom
    from pydicom.datadict import dictionary_VR
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    planted: dict[str, str] = {PRIVATE_CREATOR: "private creator (0009,0010)"}
    rng = np.random.default_rng(seed)
    p = _Planter(_Tokens("PHI7Q"), planted, sequence_depth)
    for i in range(n):
        path = phi_dicom_path(root, i)
        name = path.name
        before = set(planted)

        ds = Dataset()
        for attr in ANNEX_E_BASIC_PROFILE:
            if attr.tag in NOT_PLANTABLE_IN_FILES or attr.tag == MEDIA_STORAGE_SOP_INSTANCE_UID:
                continue
            vr = dictionary_VR(attr.tag)
            ds.add_new(
                attr.tag, vr.split(" or ")[0], p.value(vr, f"{name} {_tag_str(attr.tag)} {attr.keyword}")
            )
        _add_private_phi(ds, p, name)

        # The image itself: a valid 16-bit MONOCHROME2 CT slice (none of these attributes is in Annex E).
        pixels = _ct_pixels(rng)
        ds.SOPClassUID = CTImageStorage
        ds.Modality = "CT"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.BurnedInAnnotation = "NO"  # YES would (rightly) get the file rejected before any PHI is read
        ds.BodyPartExamined = "CHEST"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = pixels.shape
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.PixelSpacing = ["0.7", "0.7"]
        ds.PixelData = pixels.tobytes()

        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID  # (0002,0003), Annex E "U": a PHI UID too
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta

        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        _plant_path(path, root, planted)

        # Self-check: the file is a valid image and every value planted in it is really in its bytes.
        back = pydicom.dcmread(path)
        if back.pixel_array.shape != pixels.shape or not np.array_equal(back.pixel_array, pixels):
            raise AssertionError(f"{path}: pixel data does not read back")
        raw = path.read_bytes()
        missing = [s for s in set(planted) - before if planted[s].startswith(name) and s.encode() not in raw]
        if missing:
            raise AssertionError(f"{path}: planted values not found in the file: {missing[:5]}")
    return planted


def make_phi_dicoms(root: Path, n: int = 3) -> list[str]:
    """Write ``n`` PHI-laden DICOMs under ``root`` (see :func:`make_phi_dicoms_with_origins`).

    Returns:
        The planted PHI strings.
    """
    return list(make_phi_dicoms_with_origins(root, n))


def make_phi_images(root: Path, *, seed: int = 1) -> tuple[list[Path], dict[str, str]]:
    """Write one PNG and one JPEG in a PHI-named folder, with PHI in their names and metadata.

    The PNG carries PHI in a plain tEXt chunk, a compressed zTXt chunk and an iTXt chunk; the JPEG in a COM
    comment and in EXIF Artist/ImageDescription.

    Returns:
        The image paths, and every planted string mapped to where it was planted.
    """
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    planted: dict[str, str] = {}
    p = _Planter(_Tokens("PHI8P"), planted, 1)
    rng = np.random.default_rng(seed)
    folder = root / "PHI_ROE^JANE_MRN87654321"
    folder.mkdir(parents=True, exist_ok=True)
    png = folder / "PHI_xray_ROE^JANE_19440229.png"
    jpg = folder / "PHI_photo_ROE^JANE_19440301.jpg"

    yy, xx = np.mgrid[0:70, 0:50]
    img = np.clip(40 + 2.5 * yy + 1.5 * xx + rng.normal(0, 6, yy.shape), 0, 255).astype(np.uint8)
    info = PngInfo()
    info.add_text("PatientName", p.value("PN", f"{png.name} tEXt PatientName"))
    info.add_text("Comment", p.value("LT", f"{png.name} zTXt Comment"), zip=True)
    info.add_itxt("Description", p.value("LT", f"{png.name} iTXt Description"), zip=True)
    Image.fromarray(img, mode="L").save(png, pnginfo=info)

    yy, xx = np.mgrid[0:48, 0:64]
    img = np.clip(200 - 2.0 * yy - 1.0 * xx + rng.normal(0, 6, yy.shape), 0, 255).astype(np.uint8)
    exif = Image.Exif()
    exif[0x013B] = p.value("PN", f"{jpg.name} EXIF Artist")
    exif[0x010E] = p.value("LO", f"{jpg.name} EXIF ImageDescription")
    comment = p.value("LT", f"{jpg.name} JPEG COM comment")
    Image.fromarray(img, mode="L").save(jpg, quality=95, comment=comment.encode(), exif=exif.tobytes())

    for path in (png, jpg):
        _plant_path(path, root, planted)
        raw = path.read_bytes()
        hidden = [
            s for s, o in planted.items() if o.startswith(path.name) and "zTXt" not in o and "iTXt" not in o
        ]
        missing = [s for s in hidden if s.encode() not in raw]
        if missing:
            raise AssertionError(f"{path}: planted values not found in the file: {missing}")
    return [png, jpg], planted


# ------------------------------------------------------------------------------------------------ scanner
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
_ENCODINGS = ("utf-8", "utf-16-le", "utf-16-be")


@dataclass(frozen=True)
class Leak:
    """A planted PHI string found somewhere it must not be."""

    needle: str
    where: str
    how: str

    def __str__(self) -> str:
        return f"{self.needle!r} in {self.where} ({self.how})"


def _variants(s: str) -> dict[str, str]:
    """The string and the forms a pipeline may turn it into: path-sanitised and URL-quoted."""
    out = {s: ""}
    for form, v in (
        ("sanitised", _SAFE.sub("_", s)),
        ("url-quoted", urllib.parse.quote(s)),
        ("url-quoted+", urllib.parse.quote_plus(s)),
    ):
        out.setdefault(v, f", as {form} {v!r}")
    return out


def _json_strings(obj: Any) -> Iterator[str]:
    """Every key and scalar in a JSON document, descending into JSON documents embedded in strings."""
    if isinstance(obj, str):
        yield obj
        if obj[:1] in ("{", "["):
            with contextlib.suppress(ValueError):
                yield from _json_strings(json.loads(obj))
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield str(k)
            yield from _json_strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _json_strings(v)
    elif obj is not None:
        yield str(obj)


def _cell_bytes(values: Iterable[Any]) -> bytes:
    parts: list[bytes] = []
    for v in values:
        if v is None:
            continue
        if isinstance(v, bytes | bytearray | memoryview):
            parts.append(bytes(v))
        elif isinstance(v, str):
            parts.append(v.encode("utf-8", "surrogatepass"))
        elif isinstance(v, Mapping | list):
            parts.extend(s.encode("utf-8", "surrogatepass") for s in _json_strings(v))
        else:
            parts.append(str(v).encode())
    return b"\n".join(parts)


class PhiScanner:
    """Finds planted PHI strings in bytes, text and whole folder trees.

    Matching is case-insensitive and covers UTF-8, UTF-16 (LE and BE), path-sanitised and URL-quoted forms.
    Beyond the raw bytes of every file it also looks inside what raw bytes can hide: decoded JSON strings,
    every Parquet cell (pages are compressed) and Parquet key-value metadata, and PNG/JPEG text metadata
    (zTXt/iTXt chunks are compressed). Every path name below the scanned root is checked too.
    """

    def __init__(self, planted: Iterable[str]) -> None:
        self.planted = sorted(set(planted))
        self._needles: list[tuple[bytes, str, str]] = []
        for s in self.planted:
            for v, note in _variants(s).items():
                for enc in _ENCODINGS:
                    self._needles.append((v.lower().encode(enc), s, f"{enc}{note}"))

    def scan_bytes(self, data: bytes, where: str, how: str = "raw bytes") -> list[Leak]:
        low = data.lower()
        found: dict[str, str] = {}
        for needle, s, enc in self._needles:
            if s not in found and needle in low:
                found[s] = enc
        return [Leak(s, where, f"{how}, {enc}") for s, enc in found.items()]

    def scan_text(self, text: str, where: str, how: str = "text") -> list[Leak]:
        return self.scan_bytes(text.encode("utf-8", "surrogatepass"), where, how)

    def scan_tree(self, root: Path, name: str | None = None) -> list[Leak]:
        """Scan every path name and every file under ``root``; ``where`` is reported as ``name/relpath``."""
        label = name or root.name
        leaks: list[Leak] = []
        for path in sorted(root.rglob("*")):
            where = f"{label}/{path.relative_to(root).as_posix()}"
            leaks += self.scan_text(path.relative_to(root).as_posix(), where, "path name")
            if path.is_file() and not path.is_symlink():
                leaks += self.scan_file(path, where)
        return leaks

    def scan_file(self, path: Path, where: str) -> list[Leak]:
        data = path.read_bytes()
        leaks = self.scan_bytes(data, where, "raw bytes")
        suffix = path.suffix.lower()
        if suffix in (".json", ".crc") or path.name == "_last_checkpoint":
            leaks += self._scan_json(data, where)
        elif suffix == ".parquet":
            leaks += self._scan_parquet(path, where)
        elif suffix in (".png", ".jpg", ".jpeg"):
            leaks += self._scan_image(path, where)
        elif suffix == ".dcm":
            leaks += self.scan_dicom(path, where)
        return leaks

    def scan_dicom(self, path: Path, where: str) -> list[Leak]:
        """Scan every decoded DICOM element value, file meta and nested sequence items included.

        Raw bytes miss values in a deflated data set or a non-UTF-8 character set; decoding finds them.
        """
        import pydicom

        ds = pydicom.dcmread(path, force=True)
        texts = [f"{el.tag} {el.keyword}={el.value!r}" for el in ds.file_meta.iterall()]
        texts += [f"{el.tag} {el.keyword}={el.value!r}" for el in ds.iterall() if el.VR != "SQ"]
        return self.scan_text("\n".join(texts), where, "decoded DICOM elements")

    def _scan_json(self, data: bytes, where: str) -> list[Leak]:
        strings: list[str] = []
        for line in data.decode("utf-8", "replace").splitlines():
            try:
                strings.extend(_json_strings(json.loads(line)))
            except ValueError:
                continue
        return self.scan_text("\n".join(strings), where, "decoded JSON strings")

    def _scan_parquet(self, path: Path, where: str) -> list[Leak]:
        import pyarrow.parquet as pq

        leaks: list[Leak] = []
        md = pq.read_metadata(path)
        kv = md.metadata or {}
        leaks += self.scan_bytes(b"\n".join(k + b"\n" + v for k, v in kv.items()), where, "parquet metadata")
        table = pq.read_table(path)
        for name in table.column_names:
            blob = _cell_bytes(table.column(name).to_pylist())
            leaks += self.scan_bytes(blob, where, f"parquet cells of column {name!r}")
        return leaks

    def _scan_image(self, path: Path, where: str) -> list[Leak]:
        from PIL import Image

        texts: list[str] = []
        with Image.open(path) as im:
            im.load()  # text chunks after the image data are read only now
            texts += [f"{k}={v!r}" for k, v in im.info.items()]
            texts += [f"{k}={v!r}" for k, v in getattr(im, "text", {}).items()]
            texts += [f"{k}={v!r}" for k, v in im.getexif().items()]
        return self.scan_text("\n".join(texts), where, "decoded image metadata")


def scan_for_phi(roots: Mapping[str, Path], planted: Iterable[str]) -> list[Leak]:
    """Scan several folder trees (named for the report) for any planted string."""
    scanner = PhiScanner(planted)
    leaks: list[Leak] = []
    for name, root in roots.items():
        leaks += scanner.scan_tree(root, name)
    return leaks
