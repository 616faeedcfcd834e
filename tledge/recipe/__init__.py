"""Recipes: one TOML file that says what to train, export, validate and benchmark.

    spec    what a recipe is: one frozen dataclass per table, each key's default and bounds
    rules   the checks that involve more than one key, and the one recipe-cycle check
    load    reading, checking and resolving a recipe, and the other recipes it names
    dump    a recipe written back as TOML
"""
