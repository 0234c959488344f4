"""The negation rule on hand-checked examples: the expected texts below were written and
read by a person (not derived from the rule's own patterns), so a wrong pattern in the rule
cannot make this test agree with it. Real covid_cxr notes (shortened) and made-up styles."""

from __future__ import annotations

import pytest

from regionmed.apps.curation.captions import CaptionConfig, rule_negation

CFG = CaptionConfig()

EXPECTED = [
    # real covid_cxr notes (first sentences)
    ("Aspiration event a few hours before presentation. Bilateral inhomogeneous patchy airspace opacities mainly in "
     "the lower zones.",
     "Aspiration event a few hours before presentation. No bilateral inhomogeneous patchy airspace opacities mainly in "
     "the lower zones."),
    ("Diffuse patchy airspace consolidation in the mid/lower zones bilaterally. ET tube, right jugular central line and "
     "NG tube in situ. No pleural abnormality.",
     "No diffuse patchy airspace consolidation in the mid/lower zones bilaterally. ET tube, right jugular central line "
     "and NG tube in situ. No pleural abnormality."),
    ("The chest radiograph obtained on admission (not shown) was normal. Anteroposterior radiograph obtained 2 days "
     "after admission shows focal consolidation in the right lung.",
     "The chest radiograph obtained on admission (not shown) was normal. Anteroposterior radiograph obtained 2 days "
     "after admission shows no focal consolidation in the right lung."),
    # made-up styles
    ("PA chest radiograph. A 15 mm pulmonary nodule in the right upper zone.",  # the case: the view is kept
     "PA chest radiograph. No pulmonary nodule in the right upper zone."),
    ("FINDINGS: Frontal view of the chest. There is a small left pleural effusion.",
     "FINDINGS: Frontal view of the chest. There is no small left pleural effusion."),
    ("No pneumothorax.", "Pneumothorax."),
    ("The heart size is normal. Right lower lobe consolidation is seen.",
     "The heart size is normal. Right lower lobe consolidation is not seen."),
    ("1. Cardiomegaly. 2. Mild pulmonary edema.", "1. No cardiomegaly. 2. Mild pulmonary edema."),
    ("The lungs are clear without focal consolidation.", "The lungs are clear with focal consolidation."),
]

NOT_FIRED = [
    "No change in the right pleural effusion.",  # a negated change is not a negated finding
    "Chest radiograph (AP Supine view).",
    "PA chest radiograph.",
    "Is there a nodule in the left lung?",
]


@pytest.mark.parametrize("text, negative", EXPECTED)
def test_negation_changes_the_finding_as_a_reader_would(text, negative):
    assert rule_negation(text, CFG, 0) == negative


@pytest.mark.parametrize("text", NOT_FIRED)
def test_negation_does_not_fire_where_it_would_negate_nothing(text):
    assert rule_negation(text, CFG, 0) is None
