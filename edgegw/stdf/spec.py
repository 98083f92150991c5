"""The STDF V4 record table: every record type and its fields under the spec's names and types.

This table is the single source of truth for the decoder (which compiles a specialised
decoding function per record type from it) and the writer.  Field types use the spec's
codes without the ``*``:

====== ==============================================================================
U1..U8 unsigned little/big-endian integers; I1, I2, I4 signed; R4, R8 floats
C1     one character (a ``str`` of length 1)
Cn     length byte + characters (``str``; decoded latin-1 so no byte value is fatal)
Sn     two-byte length + characters (V4-2007 CNR/CDR)
Cf     fixed-length string whose length is in the field named by ``size`` (V4-2007 STR)
Uf     unsigned integer whose width (1, 2, 4 or 8) is in the field named by ``size``
B1     one byte of flags (``int``)
Bn     length byte + bytes (``bytes``)
Dn     bit count (U2) + bits (:class:`Bits`: count and bytes, so round trips are exact)
N1     nibble (``int``); arrays of N1 are packed two per byte, first in the low nibble
Vn     GDR only: field count (U2) then per field a type byte + value; type 0 is a pad
====== ==============================================================================

A field with ``count`` set is a ``kxTYPE`` array whose length is the value of that
earlier field.  ``missing`` is the spec's "missing/invalid" value, which the writer puts
into fields that are absent in the middle of a record (absent trailing fields are simply
not written: REC_LEN tells a reader they are missing).

The V4-2007 additions (VUR, PSR, NMR, CNR, SSR, CDR, STR) are in the table too, so they
are decoded rather than skipped.
"""

from __future__ import annotations

from typing import Any, NamedTuple


class Bits(NamedTuple):
    """A ``D*n`` value: ``count`` bits stored in ``data`` (first bit in the LSB of byte 0)."""

    count: int  # type: ignore[assignment]  # (tuple.count: shadowed)
    data: bytes


class Field(NamedTuple):
    name: str
    type: str
    #: for ``kxTYPE`` arrays: the name of the earlier field that holds the element count
    count: str | None = None  # type: ignore[assignment]  # (tuple.count: shadowed)
    #: for ``Uf``/``Cf``: the name of the earlier field that holds the element size
    size: str | None = None
    #: the spec's missing/invalid value; None means "the type's default" (see DEFAULTS)
    missing: Any = None


class RecordSpec(NamedTuple):
    name: str
    typ: int
    sub: int
    fields: tuple[Field, ...]
    description: str


#: missing value by type when the spec names none for a field
DEFAULTS: dict[str, Any] = {
    "U1": 0, "U2": 0, "U4": 0, "U8": 0, "I1": 0, "I2": 0, "I4": 0, "I8": 0,
    "R4": 0.0, "R8": 0.0, "C1": " ", "Cn": "", "Sn": "", "Cf": "", "Uf": 0,
    "B1": 0, "Bn": b"", "Dn": Bits(0, b""), "N1": 0, "Vn": [],
}

#: struct codes of the fixed-size scalar types
STRUCT_CODES: dict[str, str] = {
    "U1": "B", "U2": "H", "U4": "I", "U8": "Q",
    "I1": "b", "I2": "h", "I4": "i", "I8": "q",
    "R4": "f", "R8": "d", "B1": "B", "C1": "c",
}

#: GDR ``V*n`` type codes -> STDF type (0 is the pad byte: no data follows)
GDR_TYPES: dict[int, str] = {
    0: "B0", 1: "U1", 2: "U2", 3: "U4", 4: "I1", 5: "I2", 6: "I4",
    7: "R4", 8: "R8", 10: "Cn", 11: "Bn", 12: "Dn", 13: "N1",
}

U4_MISSING = 4294967295


def _f(spec: str) -> tuple[Field, ...]:
    """Parse a compact field list: ``NAME:TYPE[:count=F][:size=F][:missing=V]`` per line."""
    out = []
    for line in spec.split():
        name, typ, *opts = line.split(":")
        kw: dict[str, Any] = {}
        for opt in opts:
            key, value = opt.split("=", 1)
            if key == "missing":
                kw[key] = " " if value == "space" else (
                    float(value) if typ in ("R4", "R8") else int(value))
            else:
                kw[key] = value
        out.append(Field(name, typ, **kw))
    return tuple(out)


_PTR_TAIL = """
OPT_FLAG:B1 RES_SCAL:I1 LLM_SCAL:I1 HLM_SCAL:I1 LO_LIMIT:R4 HI_LIMIT:R4
"""

RECORDS: tuple[RecordSpec, ...] = (
    RecordSpec("FAR", 0, 10, _f("CPU_TYPE:U1 STDF_VER:U1"), "File Attributes"),
    RecordSpec("ATR", 0, 20, _f("MOD_TIM:U4 CMD_LINE:Cn"), "Audit Trail"),
    RecordSpec("VUR", 0, 30, _f("UPD_CNT:U1 UPD_NAM:Cn:count=UPD_CNT"),
               "Version Update (V4-2007)"),
    RecordSpec("MIR", 1, 10, _f("""
        SETUP_T:U4 START_T:U4 STAT_NUM:U1 MODE_COD:C1 RTST_COD:C1 PROT_COD:C1
        BURN_TIM:U2:missing=65535 CMOD_COD:C1 LOT_ID:Cn PART_TYP:Cn NODE_NAM:Cn TSTR_TYP:Cn
        JOB_NAM:Cn JOB_REV:Cn SBLOT_ID:Cn OPER_NAM:Cn EXEC_TYP:Cn EXEC_VER:Cn TEST_COD:Cn
        TST_TEMP:Cn USER_TXT:Cn AUX_FILE:Cn PKG_TYP:Cn FAMLY_ID:Cn DATE_COD:Cn FACIL_ID:Cn
        FLOOR_ID:Cn PROC_ID:Cn OPER_FRQ:Cn SPEC_NAM:Cn SPEC_VER:Cn FLOW_ID:Cn SETUP_ID:Cn
        DSGN_REV:Cn ENG_ID:Cn ROM_COD:Cn SERL_NUM:Cn SUPR_NAM:Cn"""), "Master Information"),
    RecordSpec("MRR", 1, 20, _f("FINISH_T:U4 DISP_COD:C1 USR_DESC:Cn EXC_DESC:Cn"),
               "Master Results"),
    RecordSpec("PCR", 1, 30, _f(f"""
        HEAD_NUM:U1 SITE_NUM:U1 PART_CNT:U4 RTST_CNT:U4:missing={U4_MISSING}
        ABRT_CNT:U4:missing={U4_MISSING} GOOD_CNT:U4:missing={U4_MISSING}
        FUNC_CNT:U4:missing={U4_MISSING}"""), "Part Count"),
    RecordSpec("HBR", 1, 40, _f("""
        HEAD_NUM:U1 SITE_NUM:U1 HBIN_NUM:U2 HBIN_CNT:U4 HBIN_PF:C1 HBIN_NAM:Cn"""),
               "Hardware Bin"),
    RecordSpec("SBR", 1, 50, _f("""
        HEAD_NUM:U1 SITE_NUM:U1 SBIN_NUM:U2 SBIN_CNT:U4 SBIN_PF:C1 SBIN_NAM:Cn"""),
               "Software Bin"),
    RecordSpec("PMR", 1, 60, _f("""
        PMR_INDX:U2 CHAN_TYP:U2 CHAN_NAM:Cn PHY_NAM:Cn LOG_NAM:Cn
        HEAD_NUM:U1:missing=1 SITE_NUM:U1:missing=1"""), "Pin Map"),
    RecordSpec("PGR", 1, 62, _f("GRP_INDX:U2 GRP_NAM:Cn INDX_CNT:U2 PMR_INDX:U2:count=INDX_CNT"),
               "Pin Group"),
    RecordSpec("PLR", 1, 63, _f("""
        GRP_CNT:U2 GRP_INDX:U2:count=GRP_CNT GRP_MODE:U2:count=GRP_CNT
        GRP_RADX:U1:count=GRP_CNT PGM_CHAR:Cn:count=GRP_CNT RTN_CHAR:Cn:count=GRP_CNT
        PGM_CHAL:Cn:count=GRP_CNT RTN_CHAL:Cn:count=GRP_CNT"""), "Pin List"),
    RecordSpec("RDR", 1, 70, _f("NUM_BINS:U2 RTST_BIN:U2:count=NUM_BINS"), "Retest Data"),
    RecordSpec("SDR", 1, 80, _f("""
        HEAD_NUM:U1 SITE_GRP:U1 SITE_CNT:U1 SITE_NUM:U1:count=SITE_CNT
        HAND_TYP:Cn HAND_ID:Cn CARD_TYP:Cn CARD_ID:Cn LOAD_TYP:Cn LOAD_ID:Cn DIB_TYP:Cn
        DIB_ID:Cn CABL_TYP:Cn CABL_ID:Cn CONT_TYP:Cn CONT_ID:Cn LASR_TYP:Cn LASR_ID:Cn
        EXTR_TYP:Cn EXTR_ID:Cn"""), "Site Description"),
    RecordSpec("PSR", 1, 90, _f("""
        CONT_FLG:B1 PSR_INDX:U2 PSR_NAM:Cn OPT_FLG:B1 TOTP_CNT:U2 LOCP_CNT:U2
        PAT_BGN:U8:count=LOCP_CNT PAT_END:U8:count=LOCP_CNT PAT_FILE:Cn:count=LOCP_CNT
        PAT_LBL:Cn:count=LOCP_CNT FILE_UID:Cn:count=LOCP_CNT ATPG_DSC:Cn:count=LOCP_CNT
        SRC_ID:Cn:count=LOCP_CNT"""), "Pattern Sequence (V4-2007)"),
    RecordSpec("NMR", 1, 91, _f("""
        CONT_FLG:B1 TOTM_CNT:U2 LOCM_CNT:U2 PMR_INDX:U2:count=LOCM_CNT
        ATPG_NAM:Cn:count=LOCM_CNT"""), "Name Map (V4-2007)"),
    RecordSpec("CNR", 1, 92, _f("CHN_NUM:U2 BIT_POS:U4 CELL_NAM:Sn"), "Cell Name (V4-2007)"),
    RecordSpec("SSR", 1, 93, _f("SSR_NAM:Cn CHN_CNT:U2 CHN_LIST:U2:count=CHN_CNT"),
               "Scan Structure (V4-2007)"),
    RecordSpec("CDR", 1, 94, _f("""
        CONT_FLG:B1 CDR_INDX:U2 CHN_NAM:Cn CHN_LEN:U4 SIN_PIN:U2 SOUT_PIN:U2 MSTR_CNT:U1
        M_CLKS:U2:count=MSTR_CNT SLAV_CNT:U1 S_CLKS:U2:count=SLAV_CNT INV_VAL:U1
        LST_CNT:U2 CELL_LST:Sn:count=LST_CNT"""), "Chain Description (V4-2007)"),
    RecordSpec("WIR", 2, 10, _f("HEAD_NUM:U1 SITE_GRP:U1:missing=255 START_T:U4 WAFER_ID:Cn"),
               "Wafer Information"),
    RecordSpec("WRR", 2, 20, _f(f"""
        HEAD_NUM:U1 SITE_GRP:U1:missing=255 FINISH_T:U4 PART_CNT:U4
        RTST_CNT:U4:missing={U4_MISSING} ABRT_CNT:U4:missing={U4_MISSING}
        GOOD_CNT:U4:missing={U4_MISSING} FUNC_CNT:U4:missing={U4_MISSING}
        WAFER_ID:Cn FABWF_ID:Cn FRAME_ID:Cn MASK_ID:Cn USR_DESC:Cn EXC_DESC:Cn"""),
               "Wafer Results"),
    RecordSpec("WCR", 2, 30, _f("""
        WAFR_SIZ:R4 DIE_HT:R4 DIE_WID:R4 WF_UNITS:U1 WF_FLAT:C1
        CENTER_X:I2:missing=-32768 CENTER_Y:I2:missing=-32768 POS_X:C1 POS_Y:C1"""),
               "Wafer Configuration"),
    RecordSpec("PIR", 5, 10, _f("HEAD_NUM:U1 SITE_NUM:U1"), "Part Information"),
    RecordSpec("PRR", 5, 20, _f("""
        HEAD_NUM:U1 SITE_NUM:U1 PART_FLG:B1 NUM_TEST:U2 HARD_BIN:U2
        SOFT_BIN:U2:missing=65535 X_COORD:I2:missing=-32768 Y_COORD:I2:missing=-32768
        TEST_T:U4 PART_ID:Cn PART_TXT:Cn PART_FIX:Bn"""), "Part Results"),
    RecordSpec("TSR", 10, 30, _f(f"""
        HEAD_NUM:U1 SITE_NUM:U1 TEST_TYP:C1 TEST_NUM:U4 EXEC_CNT:U4:missing={U4_MISSING}
        FAIL_CNT:U4:missing={U4_MISSING} ALRM_CNT:U4:missing={U4_MISSING}
        TEST_NAM:Cn SEQ_NAME:Cn TEST_LBL:Cn OPT_FLAG:B1:missing=255 TEST_TIM:R4 TEST_MIN:R4
        TEST_MAX:R4 TST_SUMS:R4 TST_SQRS:R4"""), "Test Synopsis"),
    RecordSpec("PTR", 15, 10, _f("""
        TEST_NUM:U4 HEAD_NUM:U1 SITE_NUM:U1 TEST_FLG:B1 PARM_FLG:B1 RESULT:R4 TEST_TXT:Cn
        ALARM_ID:Cn""" + _PTR_TAIL + """ UNITS:Cn C_RESFMT:Cn C_LLMFMT:Cn C_HLMFMT:Cn
        LO_SPEC:R4 HI_SPEC:R4"""), "Parametric Test"),
    RecordSpec("MPR", 15, 15, _f("""
        TEST_NUM:U4 HEAD_NUM:U1 SITE_NUM:U1 TEST_FLG:B1 PARM_FLG:B1 RTN_ICNT:U2 RSLT_CNT:U2
        RTN_STAT:N1:count=RTN_ICNT RTN_RSLT:R4:count=RSLT_CNT TEST_TXT:Cn ALARM_ID:Cn"""
        + _PTR_TAIL + """ START_IN:R4 INCR_IN:R4 RTN_INDX:U2:count=RTN_ICNT UNITS:Cn
        UNITS_IN:Cn C_RESFMT:Cn C_LLMFMT:Cn C_HLMFMT:Cn LO_SPEC:R4 HI_SPEC:R4"""),
               "Multiple-Result Parametric"),
    RecordSpec("FTR", 15, 20, _f("""
        TEST_NUM:U4 HEAD_NUM:U1 SITE_NUM:U1 TEST_FLG:B1 OPT_FLAG:B1:missing=255 CYCL_CNT:U4
        REL_VADR:U4 REPT_CNT:U4 NUM_FAIL:U4 XFAIL_AD:I4 YFAIL_AD:I4 VECT_OFF:I2 RTN_ICNT:U2
        PGM_ICNT:U2 RTN_INDX:U2:count=RTN_ICNT RTN_STAT:N1:count=RTN_ICNT
        PGM_INDX:U2:count=PGM_ICNT PGM_STAT:N1:count=PGM_ICNT FAIL_PIN:Dn VECT_NAM:Cn
        TIME_SET:Cn OP_CODE:Cn TEST_TXT:Cn ALARM_ID:Cn PROG_TXT:Cn RSLT_TXT:Cn
        PATG_NUM:U1:missing=255 SPIN_MAP:Dn"""), "Functional Test"),
    RecordSpec("STR", 15, 30, _f("""
        CONT_FLG:B1 TEST_NUM:U4 HEAD_NUM:U1 SITE_NUM:U1 PSR_REF:U2 TEST_FLG:B1 LOG_TYP:Cn
        TEST_TXT:Cn ALARM_ID:Cn PROG_TXT:Cn RSLT_TXT:Cn Z_VAL:U1 FMU_FLG:B1 MASK_MAP:Dn
        FAL_MAP:Dn CYC_CNT:U8 TOTF_CNT:U4 TOTL_CNT:U4 CYC_BASE:U8 BIT_BASE:U4 COND_CNT:U2
        LIM_CNT:U2 CYC_SIZE:U1 PMR_SIZE:U1 CHN_SIZE:U1 PAT_SIZE:U1 BIT_SIZE:U1 U1_SIZE:U1
        U2_SIZE:U1 U3_SIZE:U1 UTX_SIZE:U1 CAP_BGN:U2 LIM_INDX:U2:count=LIM_CNT
        LIM_SPEC:U4:count=LIM_CNT COND_LST:Cn:count=COND_CNT
        CYCO_CNT:U2 CYC_OFST:Uf:count=CYCO_CNT:size=CYC_SIZE
        PMR_CNT:U2 PMR_INDX:Uf:count=PMR_CNT:size=PMR_SIZE
        CHN_CNT:U2 CHN_NUM:Uf:count=CHN_CNT:size=CHN_SIZE
        EXP_CNT:U2 EXP_DATA:U1:count=EXP_CNT CAP_CNT:U2 CAP_DATA:U1:count=CAP_CNT
        NEW_CNT:U2 NEW_DATA:U1:count=NEW_CNT PAT_CNT:U2 PAT_NUM:Uf:count=PAT_CNT:size=PAT_SIZE
        BPOS_CNT:U2 BIT_POS:Uf:count=BPOS_CNT:size=BIT_SIZE
        USR1_CNT:U2 USR1:Uf:count=USR1_CNT:size=U1_SIZE
        USR2_CNT:U2 USR2:Uf:count=USR2_CNT:size=U2_SIZE
        USR3_CNT:U2 USR3:Uf:count=USR3_CNT:size=U3_SIZE
        TXT_CNT:U2 USER_TXT:Cf:count=TXT_CNT:size=UTX_SIZE"""), "Scan Test (V4-2007)"),
    RecordSpec("BPS", 20, 10, _f("SEQ_NAME:Cn"), "Begin Program Section"),
    RecordSpec("EPS", 20, 20, (), "End Program Section"),
    RecordSpec("GDR", 50, 10, _f("GEN_DATA:Vn"), "Generic Data"),
    RecordSpec("DTR", 50, 30, _f("TEXT_DAT:Cn"), "Datalog Text"),
)

BY_NAME: dict[str, RecordSpec] = {r.name: r for r in RECORDS}
BY_TYPE: dict[tuple[int, int], RecordSpec] = {(r.typ, r.sub): r for r in RECORDS}

#: REC_TYP groups the spec defines (180/181 are reserved for Image/IG900 software)
KNOWN_REC_TYPS = frozenset({0, 1, 2, 5, 10, 15, 20, 50, 180, 181})


def missing_value(field: Field) -> Any:
    """The value the writer puts into an absent field that is followed by present ones."""
    if field.count is not None:
        return []
    if field.missing is not None:
        return field.missing
    return DEFAULTS[field.type]
