"""De-identification: keyed, irreversible source and patient identifiers, and the metadata allow-lists.

Two allow-lists decide what of a file's header may reach the store:

* :data:`ALLOWED_META` names the only metadata *keys* a reader may return (the readers build their
  metadata from it, and :func:`allowed_meta` filters by it before anything is stored).
* :func:`defined_term` decides which *values* of the free-text attributes among them survive. Modality,
  Body Part Examined and View Position are Code Strings that writers fill by hand (``ZZQ800BODY DOE``
  was seen in a PACS export), so a value is kept only when it is one of the standard's defined terms
  for that attribute, and a SOP Class or Transfer Syntax UID only when pydicom knows it as one; anything
  else is stored as nothing (None), never as written.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping, Sequence
from typing import Any

# Technical attributes that describe how an image was acquired and encoded, never who or when.
# Everything a reader returns is filtered through this list before it can reach the store, so a reader
# that grows a new field cannot leak it by accident.
ALLOWED_META: tuple[str, ...] = (
    "source_format",
    "modality",
    "photometric",
    "orig_rows",
    "orig_cols",
    "pixel_spacing",
    "bits_stored",
    "transfer_syntax",
    "sop_class",
    "window",
    "body_part",
    "view_position",
)

# DICOM PS3.3 C.7.3.1.1.1 Modality defined terms, with the retired ones, which older archives still hold.
MODALITY_TERMS: frozenset[str] = frozenset(
    """
    AR ASMT AU BDUS BI BMD CR CT CTPROTOCOL DG DMS DOC DX ECG EEG EMG EOG EPS ES FID GM HC HD IO IOL
    IVOCT IVUS KER KO LEN LS MG MR M3D NM OAM OCT OP OPM OPT OPTBSV OPTENF OPV OSS OT PLAN POS PR PT PX
    REG RESP RF RG RTDOSE RTIMAGE RTINTENT RTPLAN RTRAD RTRECORD RTSEGANN RTSTRUCT RWV SEG SM SMR SR SRF
    STAIN TEXTUREMAP TG US VA XA XAPROTOCOL XC
    AS CD CF CP CS DD DF DM DS EC FA FS LP MA MS OPR ST VF
    """.split()  # noqa: SIM905 -- the standard's tables, pasted as words, read better than 340 quotes
)

# Body Part Examined (0018,0015) defined terms: PS3.16 Annex L (Correspondence of Anatomic Region Codes and
# Body Part Examined Defined Terms, CID 4031), each at most 16 characters as a CS value allows. The
# standard's own spellings are kept, typos included (OCCPITALA, OCCIPTALV, ENDONASOPHARYNYX).
BODY_PART_TERMS: frozenset[str] = frozenset(
    """
    ABDOMEN ABDOMENPELVIS ABDOMINALAORTA ACA ACJOINT ADRENAL ANKLE ANTCARDIACV ANTCOMMA ANTECUBITALV
    ANTSPINALA ANTTIBIALA ANUS ANUSRECTUMSIGMD AORTA AORTICARCH APPENDIX ARM ARTERY ASCAORTA ASCENDINGCOLON
    ATLANTOAXIAL ATLANTOOCCIPITAL AXILLA AXILLARYA AXILLARYV AZYGOSVEIN BACK BASILARA BILEDUCT BILIARYTRACT
    BLADDER BLADDERURETHRA BRACHIALA BRACHIALV BRAIN BREAST BRONCHUS BULB BUTTOCK CALCANEUS CALF
    CARDIOVASCSYS CAROTID CARPUS CCA CELIACA CEPHALICV CEREBELLUM CEREBHEMISPHERE CEREBRALA CERVIX CFA CFV
    CHEEK CHEST CHESTABDOMEN CHESTABDPELVIS CHOROIDPLEXUS CIRCLEOFWILLIS CLAVICLE COCCYX COLON
    COMILIACA COMILIACV COMMONBILEDUCT CORNEA CORONARYARTERY CORONARYSINUS CSPINE CTSPINE CULDESAC
    DESCAORTA DESCENDINGCOLON DIGIT DISTALPHALANX DUODENUM EAC EAR ECA ELBOW ENDOARTERIAL ENDOCARDIAC
    ENDOESOPHAGEAL ENDOMETRIUM ENDONASAL ENDONASOPHARYNYX ENDORECTAL ENDORENAL ENDOURETERIC ENDOURETHRAL
    ENDOVAGINAL ENDOVASCULAR ENDOVENOUS ENDOVESICAL EPIDIDYMIS EPIGASTRIC ESOPHAGUS EXTILIACA EXTILIACV
    EXTJUGV EXTREMITY EYE EYELID FACE FACIALA FEMORALA FEMORALV FEMUR FIBULA FINGER FLANK FONTANEL FOOT
    FOREARM FOREFETLOCK FOREFOOT FORENAVICULAR FOREPASTERN FRONTALSINUS GALLBLADDER GASTRICV GENICULARA
    GESTSAC GLUTEAL GSV HAND HEAD HEADNECK HEART HEPATICA HEPATICV HINDFETLOCK HINDFOOT HINDNAVICULAR
    HINDPASTERN HIP HUMERUS HYPOGASTRIC HYPOPHARYNX IAC ICA ILEUM ILIACA ILIACV ILIUM INFMESA INFVENACAVA
    INGUINAL INNOMINATEA INNOMINATEV INTILIACA INTJUGULARV INTMAMMARYA INTRACRANIAL JAW JEJUNUM JOINT
    KIDNEY KNEE LACRIMALA LARGEINTESTINE LARYNX LATRIUM LATVENTRICLE LEG LEGS LFEMORALA LHEPATICV
    LHYPOCHONDRIAC LINGUALA LINGUINAL LIVER LLQ LLUMBAR LOWERLEG LOWERLIMB LOWERTRUNK LPORTALV LPULMONARYA
    LSPINE LSSPINE LSUPPULMONARYV LUMBAR LUMBARA LUMEN LUNG LUQ LVENTRICLE MANDIBLE MASTOID MAXILLA MCA
    MEDIASTINUM MESENTRICA MESENTRICV METACARPUS METATARSUS MIDHEPATICV MORISONSPOUCH MOUTH NASOPHARYNX
    NECK NECKCHEST NECKCHESTABDOMEN NECKCHESTABDPELV NOSE OCCIPTALV OCCPITALA OPHTHALMICA OPTICCANAL ORBIT
    OVARY PANCBILEDUCT PANCREAS PARASTERNAL PARATHYROID PAROTID PATELLA PCA PELVIS PELVISLOWEXTREMT
    PENILEA PENIS PERINEUM PERONEALA PHANTOM PHARYNX PHARYNXLARYNX PLACENTA POPLITEALA POPLITEALFOSSA
    POPLITEALV PORTALV POSCOMMA POSTIBIALA PROFFEMA PROFFEMV PROSTATE PULMONARYA PULMONARYV RADIALA RADIUS
    RADIUSULNA RATRIUM RECTUM RENALA RENALV RETROPERITONEUM RFEMORALA RHEPATICV RHYPOCHONDRIAC RIB
    RINGUINAL RLQ RLUMBAR RPORTALV RPULMONARYA RSUPPULMONARYV RUQ RVENTRICLE SAPHENOUSV SCALP SCAPULA
    SCJOINT SCLERA SCROTUM SELLA SEMVESICLE SESAMOID SFA SFJ SFV SHOULDER SIGMOID SIJOINT SKULL
    SMA SMALLINTESTINE SPINALCORD SPINE SPLEEN SPLENICA SPLENICV SSPINE STERNUM STIFLE STOMACH SUBCLAVIANA
    SUBCLAVIANV SUBCOSTAL SUBMANDIBULAR SUPRACLAVICULAR SUPRAPUBIC SUPTHYROIDA SVC TAIL TARSUS TESTIS
    THALAMUS THIGH THORACICAORTA THUMB THYMUS THYROID TIBIA TIBIAFIBULA TLSPINE TMJ TOE TONGUE TRACHEA
    TRACHEABRONCHUS TRANSVERSECOLON TRUNK TSPINE UGITRACT ULNA ULNARA UMBILICAL UMBILICALA UMBILICALV
    UPPERARM UPPERLIMB UPPERTRUNK UPRURINARYTRACT URETER URETHRA URINARYTRACT UTERUS VAGINA VEIN
    VERTEBRALA VULVA WHOLEBODY WING WRIST ZYGOMA 3RDVENTRICLE 4THVENTRICLE
    """.split()  # noqa: SIM905 -- the standard's tables, pasted as words, read better than 340 quotes
)

# View Position (0018,5101) defined terms of the DX/CR modules, PS3.3 C.8.11.5.1.1. "LATERAL" and "LAT",
# though common in the wild, are not among them and are therefore not kept.
VIEW_POSITION_TERMS: frozenset[str] = frozenset({"AP", "PA", "LL", "RL", "RLD", "LLD", "RLO", "LLO"})

_TERMS_BY_ATTRIBUTE: dict[str, frozenset[str]] = {
    "modality": MODALITY_TERMS,
    "body_part": BODY_PART_TERMS,
    "view_position": VIEW_POSITION_TERMS,
}


def defined_term(attribute: str, value: Any) -> str | None:
    """``value`` as the defined term of ``attribute`` it spells, or None when it is not one.

    Case and surrounding blanks (and NUL padding) are forgiven, since writers differ in them; anything
    else, a private code or free text, gives None, so nothing written by hand is ever stored.

    Args:
        attribute: ``"modality"``, ``"body_part"`` or ``"view_position"``.
        value: the attribute's value as read (a string, a multi-value, or None).

    Returns:
        The defined term, uppercase, or None.
    """
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        # A multi-valued CS (pydicom's MultiValue is a Sequence): the first value is the attribute's.
        value = value[0] if len(value) else None
    if value is None:
        return None
    term = str(value).strip(" \x00").upper()
    return term if term in _TERMS_BY_ATTRIBUTE[attribute] else None


def known_uid_name(uid: Any, kind: str) -> str | None:
    """The name of a standard UID of the given kind (``"SOP Class"``, ``"Transfer Syntax"``), else None.

    A private or unknown UID is returned as nothing rather than as its digits: its organisation root can
    name the hospital or vendor, and the name of a UID pydicom does not know is the UID itself.
    """
    if not uid:
        return None
    import pydicom.uid

    u = pydicom.uid.UID(str(uid).strip(" \x00"))
    return str(u.name) if u.is_valid and u.type == kind else None


def keyed_hash(key: bytes, kind: str, data: bytes) -> str:
    """HMAC-SHA256 of ``data`` under the store's secret key, domain-separated by ``kind``.

    Without the key nobody can confirm a guess (e.g. a patient ID) against the stored hash, yet the
    store itself recognises the same content on re-ingest.

    Args:
        key: the store's secret key.
        kind: a domain label ("source", "patient", "split") so hashes of different things never collide.
        data: the bytes to identify.

    Returns:
        The hex digest.
    """
    return hmac.new(key, kind.encode() + b"\x00" + data, hashlib.sha256).hexdigest()


def patient_from_name(name: str, pattern: str | None) -> str | None:
    """Extract a patient identifier from a file name with ``pattern`` (first non-empty group), if any."""
    if not pattern:
        return None
    m = re.search(pattern, name)
    if not m:
        return None
    groups = [g for g in m.groups() if g] or [m.group(0)]
    return groups[0]


def allowed_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    """Keep only allow-listed technical attributes; every other key is dropped."""
    return {k: meta.get(k) for k in ALLOWED_META}


def split_for(key: bytes, group: str, fractions: tuple[float, float, float]) -> str:
    """Assign ``group`` (a patient key, or the source when there is none) to train/val/test.

    The bucket comes from a keyed hash, so all images of one patient land in one split, the split is
    stable across re-ingests, and nobody without the key can steer a patient into a split.
    """
    u = int(keyed_hash(key, "split", group.encode())[:12], 16) / float(1 << 48)
    train, val, _ = fractions
    if u < train:
        return "train"
    if u < train + val:
        return "val"
    return "test"


# Config keys whose values are operator file paths. Folder names often carry patient names, so lineage
# written into the store records that such a path was given, never the path itself.
PATH_KEYS = frozenset({"sources", "labels_csv", "write_dicom"})


def redact_config(config: Any) -> Any:
    """A copy of a JSON-able config with every source/label path replaced by a placeholder."""
    if isinstance(config, dict):
        out: dict[str, Any] = {}
        for k, v in config.items():
            if k in PATH_KEYS and v is not None:
                n = len(v) if isinstance(v, list) else 1
                out[k] = f"<{n} path{'s' if n != 1 else ''}, not recorded>"
            else:
                out[k] = redact_config(v)
        return out
    if isinstance(config, list):
        return [redact_config(v) for v in config]
    return config
