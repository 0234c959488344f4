"""Values that mean "no value": one definition for every cell, field and attribute regionmed reads.

A value is missing when it is ``None``, a float NaN, or a string that, once white space
and invisible characters (zero-width spaces, a stray byte-order mark) are stripped, is:

* empty (also: white space only, including non-breaking spaces);
* one of :data:`MISSING_SPELLINGS`, in any case: the default ``na_values`` of
  ``pandas.read_csv`` (``#N/A``, ``#N/A N/A``, ``#NA``, ``-1.#IND``, ``-1.#QNAN``,
  ``-NaN``, ``-nan``, ``1.#IND``, ``1.#QNAN``, ``<NA>``, ``N/A``, ``NA``, ``NULL``,
  ``NaN``, ``None``, ``n/a``, ``nan``, ``null``), the error values a spreadsheet writes
  into a cell whose formula has no value (Excel: ``#VALUE!``, ``#REF!``, ``#DIV/0!``,
  ``#NAME?``, ``#NULL!``, ``#NUM!``, ``#SPILL!``, ``#CALC!``, ``#FIELD!``,
  ``#GETTING_DATA``, ``#BLOCKED!``, ``#CONNECT!``, ``#BUSY!``, ``#UNKNOWN!``,
  ``#EXTERNAL!``, ``#PYTHON!``), what programs print for an empty value (``NaT``,
  ``nil``, ``(null)``, ``<null>``, ``(blank)``, ``(empty)``), and ``n.a.``;
* only dashes, dots or question marks (``-``, ``--``, ``—``, ``.``, ``?``, ``??``):
  clinical exports and statistics packages (SAS, SPSS) write these for "not recorded".
  A decision: in a label column ``-`` is therefore *not* read as negative; write ``0``,
  ``no`` or ``negative``.

Not missing: HL7 null-flavour codes such as ``UNK`` or ``NI`` (also ordinary
abbreviations), and words such as ``unknown``, ``none seen`` or ``normal``, which are
text. Identifiers add their own placeholders (:func:`is_placeholder_id`).
"""

from __future__ import annotations

import math
import re
from typing import Any

__all__ = ["MISSING_SPELLINGS", "PLACEHOLDER_IDS", "is_missing", "is_placeholder_id"]

PANDAS_NA_VALUES = ("", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>",
                    "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null")
SPREADSHEET_ERRORS = ("#VALUE!", "#REF!", "#DIV/0!", "#NAME?", "#NULL!", "#NUM!", "#SPILL!", "#CALC!", "#FIELD!",
                      "#GETTING_DATA", "#BLOCKED!", "#CONNECT!", "#BUSY!", "#UNKNOWN!", "#EXTERNAL!", "#PYTHON!")
PRINTED_EMPTY = ("+nan", "NaT", "nil", "(null)", "<null>", "(blank)", "(empty)", "n.a.")

#: Spellings of "no value", compared case-insensitively (:func:`str.casefold`).
MISSING_SPELLINGS = frozenset(s.casefold() for s in PANDAS_NA_VALUES + SPREADSHEET_ERRORS + PRINTED_EMPTY)

# Dashes (hyphen-minus, hyphen, figure/en/em dash, horizontal bar, minus sign), dots and
# question marks, alone or repeated.
_MARKS_ONLY = re.compile(r"[-\u2010\u2012\u2013\u2014\u2015\u2212.?]+")
# Characters that print as nothing: zero-width space/joiners, word joiner, byte-order mark.
_INVISIBLE = "\u200b\u200c\u200d\u2060\ufeff"

#: Identifier values that identify nobody (anonymisers' and exports' placeholders), besides
#: the missing values above; an identifier of zeros only is one too.
PLACEHOLDER_IDS = frozenset({
    "0", "anon", "anonymous", "anonymized", "anonymised", "unknown", "removed", "patient", "noid", "no id", "xxx",
    "unk", "not available", "none given",
})


def _stripped(text: str) -> str:
    return text.strip().strip(_INVISIBLE).strip()


def is_missing(value: Any) -> bool:
    """True for ``None``, a float NaN, and a string that means "no value" (see the module
    docstring: blank, a spelling of :data:`MISSING_SPELLINGS` in any case, or only dashes,
    dots or question marks)."""
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    if isinstance(value, str):
        text = _stripped(value)
        return text.casefold() in MISSING_SPELLINGS or bool(_MARKS_ONLY.fullmatch(text))
    return False


def is_placeholder_id(value: Any) -> bool:
    """True when an identifier (a patient id, a DICOM PatientID) identifies nobody: missing
    (:func:`is_missing`), one of :data:`PLACEHOLDER_IDS` (any case), or zeros only. Such
    values must not group records: every export's anonymised rows would become one patient."""
    if is_missing(value):
        return True
    text = _stripped(str(value))
    return text.casefold() in PLACEHOLDER_IDS or set(text) <= {"0"}
