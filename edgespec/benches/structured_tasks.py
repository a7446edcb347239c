"""The structured-output bench set: extraction from a paragraph into schemas of growing size (flat, nested, arrays
of objects, enums, numbers, optional fields), JSON mode, regexes (dates, identifiers) and tool calls with strict
schemas. Each task is a chat message and the ``response_format`` its answer must follow."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    name: str
    message: str
    response_format: dict

    @property
    def schema(self) -> dict | None:
        """The JSON schema every answer must satisfy (JSON mode: any object; None for a regex)."""
        kind = self.response_format["type"]
        if kind == "json_object":
            return {"type": "object"}
        if kind == "json_schema":
            return self.response_format["json_schema"]["schema"]
        return None


def _schema(name: str, schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def _obj(props: dict, required: list[str] | None = None) -> dict:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": False}


S = {"type": "string", "maxLength": 60}
INT = {"type": "integer"}
NUM = {"type": "number"}
BOOL = {"type": "boolean"}

EMAIL = ("Hi team, this is Priya Raman from Northwind Logistics. Our order #A-20931 of 40 pallets arrived on "
         "2024-03-18 in Rotterdam, but 3 pallets were damaged. Please call me at +31 20 555 0142 or write to "
         "priya.raman@northwind.example. The invoice total was 18,450.75 EUR. I'd like a refund for the damaged "
         "goods by the end of the month.")
PAPER = ("The paper 'Sparse Mixtures for Edge Inference' by Lena Koch (ETH Zurich) and Omar Haddad (EPFL) was "
         "published at MLSys 2023. It reports a 2.4x speedup on a Raspberry Pi 5 and a 1.7x speedup on a Pixel 8, "
         "with an accuracy drop of 0.3 points on MMLU. Code is released under the Apache-2.0 license.")
RECIPE = ("Grandma's lemon cake: mix 200 g flour, 150 g sugar, 3 eggs and 100 g butter. Add the zest of 2 lemons. "
          "Bake at 180 degrees for 35 minutes. Serves 8. It is vegetarian but not vegan.")
LISTING = ("For sale: 2019 Toyota Corolla Hybrid, silver, 48,000 km, one owner, automatic. Price 17,900 USD, "
           "negotiable. Located in Austin, Texas. Contact Mark at 512-555-0199.")
PEOPLE = ("At the meeting were Ana Souza (product manager, 41), Ben Cole (engineer, 29), Chen Wei (designer, 35) "
          "and Dara Okafor (engineer, 33). Ana chaired; Ben took notes.")

TASKS: list[Task] = [
    # flat
    Task("flat-contact", f"Extract the sender's name, company and email as JSON.\n\n{EMAIL}",
         _schema("contact", _obj({"name": S, "company": S, "email": S}))),
    Task("flat-order", f"Extract the order id, pallet count and arrival date as JSON.\n\n{EMAIL}",
         _schema("order", _obj({"order_id": S, "pallets": INT, "arrival_date": S}))),
    Task("flat-car", f"Extract the car's make, model, year and mileage in km as JSON.\n\n{LISTING}",
         _schema("car", _obj({"make": S, "model": S, "year": INT, "mileage_km": INT}))),
    Task("numbers-invoice", f"Extract the invoice total and the damaged pallets as JSON.\n\n{EMAIL}",
         _schema("invoice", _obj({"total": NUM, "currency": S, "damaged_pallets": INT}))),
    # enums and booleans
    Task("enum-sentiment", f"Classify the sentiment of this email as JSON.\n\n{EMAIL}",
         _schema("sentiment", _obj({"sentiment": {"enum": ["positive", "neutral", "negative"]},
                                    "urgent": BOOL}))),
    Task("enum-intent", f"What does the sender want? Answer as JSON.\n\n{EMAIL}",
         _schema("intent", _obj({"intent": {"enum": ["refund", "replacement", "information", "complaint"]},
                                 "deadline": S}))),
    Task("enum-diet", f"Classify this recipe as JSON.\n\n{RECIPE}",
         _schema("diet", _obj({"vegetarian": BOOL, "vegan": BOOL,
                               "course": {"enum": ["starter", "main", "dessert"]}}))),
    # optional fields
    Task("optional-listing", f"Extract the listing as JSON; leave out what is not stated.\n\n{LISTING}",
         _schema("listing", _obj({"price": NUM, "currency": S, "city": S, "color": S, "transmission": S,
                                  "accident_free": BOOL}, ["price", "currency"]))),
    Task("optional-paper", f"Extract the paper's metadata as JSON; leave out what is not stated.\n\n{PAPER}",
         _schema("paper", _obj({"title": S, "venue": S, "year": INT, "doi": S, "license": S}, ["title", "year"]))),
    # nested
    Task("nested-contact", f"Extract the sender as JSON.\n\n{EMAIL}",
         _schema("sender", _obj({"person": _obj({"name": S, "company": S}),
                                 "contact": _obj({"phone": S, "email": S})}))),
    Task("nested-car", f"Extract the listing as JSON.\n\n{LISTING}",
         _schema("listing", _obj({"vehicle": _obj({"make": S, "model": S, "year": INT}),
                                  "price": _obj({"amount": NUM, "currency": S, "negotiable": BOOL}),
                                  "location": _obj({"city": S, "state": S})}))),
    # arrays
    Task("array-strings", f"List the ingredients as JSON.\n\n{RECIPE}",
         _schema("ingredients", _obj({"ingredients": {"type": "array", "items": S, "maxItems": 8}}))),
    Task("array-objects", f"List the ingredients with quantities as JSON.\n\n{RECIPE}",
         _schema("ingredients", _obj({"ingredients": {"type": "array", "maxItems": 8, "items": _obj(
             {"name": S, "amount": NUM, "unit": S}, ["name"])}}))),
    Task("array-people", f"List the people at the meeting as JSON.\n\n{PEOPLE}",
         _schema("people", _obj({"people": {"type": "array", "maxItems": 6, "items": _obj(
             {"name": S, "role": {"enum": ["product manager", "engineer", "designer"]}, "age": INT})}}))),
    Task("large-paper", f"Extract everything about the paper as JSON.\n\n{PAPER}",
         _schema("paper", _obj({
             "title": S, "venue": S, "year": INT,
             "authors": {"type": "array", "maxItems": 4, "items": _obj({"name": S, "affiliation": S})},
             "results": {"type": "array", "maxItems": 4, "items": _obj({"device": S, "speedup": NUM})},
             "accuracy_drop": NUM, "benchmark": S, "license": {"enum": ["MIT", "Apache-2.0", "GPL-3.0", "other"]},
         }))),
    # JSON mode
    Task("json-mode-email", f"Summarize this email as a JSON object.\n\n{EMAIL}", {"type": "json_object"}),
    Task("json-mode-recipe", f"Describe this recipe as a JSON object.\n\n{RECIPE}", {"type": "json_object"}),
    # regexes
    Task("regex-date", f"On what date did the order arrive? Answer with the date only.\n\n{EMAIL}",
         {"type": "regex", "pattern": r"[0-9]{4}-[0-9]{2}-[0-9]{2}"}),
    Task("regex-order-id", f"What is the order id? Answer with the id only.\n\n{EMAIL}",
         {"type": "regex", "pattern": r"[A-Z]-[0-9]{5}"}),
    Task("regex-phone", f"What is Mark's phone number? Answer with the number only.\n\n{LISTING}",
         {"type": "regex", "pattern": r"[0-9]{3}-[0-9]{3}-[0-9]{4}"}),
    # tool calls with strict schemas (a call as {"name", "arguments"})
    Task("tool-refund", f"Call the right tool for this email.\n\n{EMAIL}",
         _schema("call", _obj({"name": {"const": "create_refund"}, "arguments": _obj(
             {"order_id": S, "pallets": INT, "amount": NUM, "currency": {"enum": ["EUR", "USD", "GBP"]}})}))),
    Task("tool-weather", "What's the weather like in Valencia tomorrow, in Celsius? Call the tool.",
         _schema("call", _obj({"name": {"const": "get_weather"}, "arguments": _obj(
             {"city": S, "day": {"enum": ["today", "tomorrow"]}, "unit": {"enum": ["celsius", "fahrenheit"]}})}))),
    Task("tool-calendar", f"Schedule a 30-minute follow-up call with Priya on 2024-03-25 at 10:00. "
                          f"Call the tool.\n\n{EMAIL}",
         _schema("call", _obj({"name": {"const": "create_event"}, "arguments": _obj(
             {"title": S, "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
              "time": {"type": "string", "pattern": "^[0-9]{2}:[0-9]{2}$"}, "duration_min": INT,
              "attendees": {"type": "array", "items": S, "maxItems": 4}})}))),
]
