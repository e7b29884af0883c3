"""
The JSON Schema of a position datagram, loaded once from the package.

Two validators come from the one document. A fastjsonschema function,
compiled at import, checks each datagram in a few microseconds. A jsonschema
validator checks the document against its metaschema and explains a
rejection for the log. It takes tens of microseconds, so it runs only for
rejections that are logged.
"""

import json
from importlib import resources

import fastjsonschema
import jsonschema
from jsonschema.exceptions import best_match

SCHEMA = json.loads(resources.files("geotaxi").joinpath("position.schema.json").read_text("utf-8"))

jsonschema.Draft202012Validator.check_schema(SCHEMA)

_explainer = jsonschema.Draft202012Validator(SCHEMA)



def _inline_definitions(node, definitions):
    """
    Return a copy of the schema with each local ``$ref`` replaced by its
    definition. fastjsonschema compiles a ``$ref`` into a function call that
    also builds the field's name, which costs about a microsecond a datagram.
    """
    if isinstance(node, dict):
        if "$ref" in node:
            name = node["$ref"].removeprefix("#/$defs/")
            return _inline_definitions(definitions[name], definitions)
        return {key: _inline_definitions(value, definitions) for key, value in node.items() if key != "$defs"}
    if isinstance(node, list):
        return [_inline_definitions(item, definitions) for item in node]
    return node


# detailed_exceptions=False keeps the schema fragment out of every exception,
# because a flood of bad datagrams would otherwise copy it per datagram.
validate = fastjsonschema.compile(
    _inline_definitions(SCHEMA, SCHEMA.get("$defs", {})),
    detailed_exceptions=False,
)

ValidationError = fastjsonschema.JsonSchemaValueException


def explain(message):
    """
    Return ``(field, reason)`` for a message that ``validate`` rejected:
    the dotted path of the first offending field ("" for the whole message)
    and jsonschema's sentence about it.
    """
    error = best_match(_explainer.iter_errors(message))
    if error is None:
        return "", "rejected by the compiled validator"
    field = ".".join(str(part) for part in error.absolute_path)
    return field, error.message
