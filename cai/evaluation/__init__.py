"""The evaluation's parts (the stage's recipe is `cai.stages.evaluate`): `prompts` (what is
asked), `answering` (the models answer, the reward model and the judge score),
`statistics` (figures with intervals, from the saved rows), `figures` (each figure's
name, unit, direction and meaning, defined once) and `summary` (the console lines).
"""
