"""The demo's small world: real facts about 175 countries, and the trained / held-out split.

    >>> from sftkit_demo.world import COUNTRIES, split_countries
    >>> trained, heldout = split_countries(seed=0)

Every country has a capital, a continent, one main language and a currency. Values are kept
simple on purpose: one language per country (the main official one as short quizzes give it,
e.g. German for Switzerland, Swahili for Kenya), one capital (the official seat, e.g. Pretoria,
Sucre, Yamoussoukro), ASCII spellings (Bogota, Reykjavik, Yaounde). Countries whose capital,
currency or status is disputed or in flux (e.g. Sri Lanka, Israel, Zimbabwe, Bulgaria) and
city-states named like their capital (Singapore, Monaco, Luxembourg) are left out.

The split decides what SFT may teach: *trained* countries appear in the SFT conversations,
*held-out* countries only in the pre-training text, so answering about them after SFT shows the
model using knowledge it learnt in pre-training rather than memorising SFT answers.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

ATTRIBUTES = ("capital", "continent", "language", "currency")
CONTINENTS = ("Europe", "Asia", "Africa", "North America", "South America", "Oceania")


@dataclass(frozen=True, slots=True)
class Country:
    """One country's facts. `definite` marks names that take "the" (the Netherlands)."""

    name: str
    capital: str
    continent: str
    language: str
    currency: str
    definite: bool = False

    def ref(self, start: bool = False) -> str:
        """The name as used in a sentence: "France", "the Netherlands", "The Netherlands" at a start."""
        if not self.definite:
            return self.name
        return ("The " if start else "the ") + self.name

    def possessive(self, start: bool = False) -> str:
        """"France's", "the Netherlands'" (names ending in s take a bare apostrophe)."""
        ref = self.ref(start)
        return ref + ("'" if ref.endswith("s") else "'s")

    def fact(self, attribute: str) -> str:
        """The value of one of `ATTRIBUTES`."""
        if attribute not in ATTRIBUTES:
            raise ValueError(f"unknown attribute {attribute!r} (expected one of {', '.join(ATTRIBUTES)})")
        return str(getattr(self, attribute))


# name | capital | language | currency, grouped by continent. "the " before a name marks `definite`.
_TABLE: dict[str, str] = {
    "Europe": """
Albania | Tirana | Albanian | lek
Andorra | Andorra la Vella | Catalan | euro
Austria | Vienna | German | euro
Belarus | Minsk | Russian | Belarusian ruble
Belgium | Brussels | Dutch | euro
Bosnia and Herzegovina | Sarajevo | Bosnian | convertible mark
Croatia | Zagreb | Croatian | euro
the Czech Republic | Prague | Czech | Czech koruna
Denmark | Copenhagen | Danish | Danish krone
Estonia | Tallinn | Estonian | euro
Finland | Helsinki | Finnish | euro
France | Paris | French | euro
Germany | Berlin | German | euro
Greece | Athens | Greek | euro
Hungary | Budapest | Hungarian | forint
Iceland | Reykjavik | Icelandic | Icelandic krona
Ireland | Dublin | English | euro
Italy | Rome | Italian | euro
Latvia | Riga | Latvian | euro
Liechtenstein | Vaduz | German | Swiss franc
Lithuania | Vilnius | Lithuanian | euro
Malta | Valletta | Maltese | euro
Moldova | Chisinau | Romanian | Moldovan leu
Montenegro | Podgorica | Montenegrin | euro
the Netherlands | Amsterdam | Dutch | euro
North Macedonia | Skopje | Macedonian | Macedonian denar
Norway | Oslo | Norwegian | Norwegian krone
Poland | Warsaw | Polish | zloty
Portugal | Lisbon | Portuguese | euro
Romania | Bucharest | Romanian | Romanian leu
Russia | Moscow | Russian | Russian ruble
Serbia | Belgrade | Serbian | Serbian dinar
Slovakia | Bratislava | Slovak | euro
Slovenia | Ljubljana | Slovene | euro
Spain | Madrid | Spanish | euro
Sweden | Stockholm | Swedish | Swedish krona
Switzerland | Bern | German | Swiss franc
Ukraine | Kyiv | Ukrainian | hryvnia
the United Kingdom | London | English | pound sterling
""",
    "Asia": """
Afghanistan | Kabul | Dari | afghani
Armenia | Yerevan | Armenian | dram
Azerbaijan | Baku | Azerbaijani | Azerbaijani manat
Bahrain | Manama | Arabic | Bahraini dinar
Bangladesh | Dhaka | Bengali | taka
Bhutan | Thimphu | Dzongkha | ngultrum
Brunei | Bandar Seri Begawan | Malay | Brunei dollar
Cambodia | Phnom Penh | Khmer | riel
China | Beijing | Chinese | yuan
Georgia | Tbilisi | Georgian | lari
India | New Delhi | Hindi | Indian rupee
Indonesia | Jakarta | Indonesian | rupiah
Iran | Tehran | Persian | Iranian rial
Iraq | Baghdad | Arabic | Iraqi dinar
Japan | Tokyo | Japanese | yen
Jordan | Amman | Arabic | Jordanian dinar
Kazakhstan | Astana | Kazakh | tenge
Kuwait | Kuwait City | Arabic | Kuwaiti dinar
Kyrgyzstan | Bishkek | Kyrgyz | Kyrgyz som
Laos | Vientiane | Lao | kip
Lebanon | Beirut | Arabic | Lebanese pound
Malaysia | Kuala Lumpur | Malay | ringgit
the Maldives | Male | Dhivehi | rufiyaa
Mongolia | Ulaanbaatar | Mongolian | tugrik
Myanmar | Naypyidaw | Burmese | kyat
Nepal | Kathmandu | Nepali | Nepalese rupee
North Korea | Pyongyang | Korean | North Korean won
Oman | Muscat | Arabic | Omani rial
Pakistan | Islamabad | Urdu | Pakistani rupee
the Philippines | Manila | Filipino | Philippine peso
Qatar | Doha | Arabic | Qatari riyal
Saudi Arabia | Riyadh | Arabic | Saudi riyal
South Korea | Seoul | Korean | South Korean won
Syria | Damascus | Arabic | Syrian pound
Tajikistan | Dushanbe | Tajik | somoni
Thailand | Bangkok | Thai | baht
Turkey | Ankara | Turkish | Turkish lira
Turkmenistan | Ashgabat | Turkmen | Turkmen manat
the United Arab Emirates | Abu Dhabi | Arabic | UAE dirham
Uzbekistan | Tashkent | Uzbek | Uzbek som
Vietnam | Hanoi | Vietnamese | dong
Yemen | Sanaa | Arabic | Yemeni rial
""",
    "Africa": """
Algeria | Algiers | Arabic | Algerian dinar
Angola | Luanda | Portuguese | kwanza
Benin | Porto-Novo | French | CFA franc
Botswana | Gaborone | Setswana | pula
Burundi | Gitega | Kirundi | Burundian franc
Cameroon | Yaounde | French | CFA franc
Cape Verde | Praia | Portuguese | Cape Verdean escudo
the Central African Republic | Bangui | French | CFA franc
Chad | N'Djamena | French | CFA franc
the Comoros | Moroni | Comorian | Comorian franc
the Democratic Republic of the Congo | Kinshasa | French | Congolese franc
the Republic of the Congo | Brazzaville | French | CFA franc
Egypt | Cairo | Arabic | Egyptian pound
Eritrea | Asmara | Tigrinya | nakfa
Ethiopia | Addis Ababa | Amharic | birr
Gabon | Libreville | French | CFA franc
the Gambia | Banjul | English | dalasi
Ghana | Accra | English | cedi
Guinea | Conakry | French | Guinean franc
Guinea-Bissau | Bissau | Portuguese | CFA franc
Ivory Coast | Yamoussoukro | French | CFA franc
Kenya | Nairobi | Swahili | Kenyan shilling
Lesotho | Maseru | Sesotho | loti
Liberia | Monrovia | English | Liberian dollar
Libya | Tripoli | Arabic | Libyan dinar
Madagascar | Antananarivo | Malagasy | ariary
Malawi | Lilongwe | Chichewa | Malawian kwacha
Mali | Bamako | Bambara | CFA franc
Mauritania | Nouakchott | Arabic | ouguiya
Morocco | Rabat | Arabic | Moroccan dirham
Mozambique | Maputo | Portuguese | metical
Namibia | Windhoek | English | Namibian dollar
Niger | Niamey | Hausa | CFA franc
Nigeria | Abuja | English | naira
Rwanda | Kigali | Kinyarwanda | Rwandan franc
Sao Tome and Principe | Sao Tome | Portuguese | dobra
Senegal | Dakar | French | CFA franc
Sierra Leone | Freetown | English | leone
Somalia | Mogadishu | Somali | Somali shilling
South Africa | Pretoria | Zulu | rand
South Sudan | Juba | English | South Sudanese pound
Sudan | Khartoum | Arabic | Sudanese pound
Tanzania | Dodoma | Swahili | Tanzanian shilling
Togo | Lome | French | CFA franc
Tunisia | Tunis | Arabic | Tunisian dinar
Uganda | Kampala | English | Ugandan shilling
Zambia | Lusaka | English | Zambian kwacha
""",
    "North America": """
Antigua and Barbuda | St. John's | English | East Caribbean dollar
the Bahamas | Nassau | English | Bahamian dollar
Barbados | Bridgetown | English | Barbadian dollar
Belize | Belmopan | English | Belize dollar
Canada | Ottawa | English | Canadian dollar
Costa Rica | San Jose | Spanish | Costa Rican colon
Cuba | Havana | Spanish | Cuban peso
Dominica | Roseau | English | East Caribbean dollar
the Dominican Republic | Santo Domingo | Spanish | Dominican peso
El Salvador | San Salvador | Spanish | US dollar
Grenada | St. George's | English | East Caribbean dollar
Guatemala | Guatemala City | Spanish | quetzal
Haiti | Port-au-Prince | Haitian Creole | gourde
Honduras | Tegucigalpa | Spanish | lempira
Jamaica | Kingston | English | Jamaican dollar
Mexico | Mexico City | Spanish | Mexican peso
Nicaragua | Managua | Spanish | cordoba
Panama | Panama City | Spanish | balboa
Saint Kitts and Nevis | Basseterre | English | East Caribbean dollar
Saint Lucia | Castries | English | East Caribbean dollar
Saint Vincent and the Grenadines | Kingstown | English | East Caribbean dollar
Trinidad and Tobago | Port of Spain | English | Trinidad and Tobago dollar
the United States | Washington | English | US dollar
""",
    "South America": """
Argentina | Buenos Aires | Spanish | Argentine peso
Bolivia | Sucre | Spanish | boliviano
Brazil | Brasilia | Portuguese | Brazilian real
Chile | Santiago | Spanish | Chilean peso
Colombia | Bogota | Spanish | Colombian peso
Ecuador | Quito | Spanish | US dollar
Guyana | Georgetown | English | Guyanese dollar
Paraguay | Asuncion | Spanish | guarani
Peru | Lima | Spanish | sol
Suriname | Paramaribo | Dutch | Surinamese dollar
Uruguay | Montevideo | Spanish | Uruguayan peso
Venezuela | Caracas | Spanish | bolivar
""",
    "Oceania": """
Australia | Canberra | English | Australian dollar
Fiji | Suva | English | Fijian dollar
the Marshall Islands | Majuro | Marshallese | US dollar
Micronesia | Palikir | English | US dollar
New Zealand | Wellington | English | New Zealand dollar
Palau | Ngerulmud | Palauan | US dollar
Papua New Guinea | Port Moresby | Tok Pisin | kina
Samoa | Apia | Samoan | tala
the Solomon Islands | Honiara | English | Solomon Islands dollar
Tonga | Nuku'alofa | Tongan | pa'anga
Tuvalu | Funafuti | Tuvaluan | Australian dollar
Vanuatu | Port Vila | Bislama | vatu
""",
}


def _parse(table: dict[str, str]) -> tuple[Country, ...]:
    """Turn the `_TABLE` text into `Country` records, failing loudly on a malformed line."""
    countries: list[Country] = []
    for continent, block in table.items():
        for line in block.strip().splitlines():
            fields = [f.strip() for f in line.split("|")]
            if len(fields) != 4 or not all(fields):
                raise ValueError(f"world table ({continent}): malformed line {line!r}")
            name, capital, language, currency = fields
            definite = name.startswith("the ")
            countries.append(Country(name.removeprefix("the "), capital, continent, language, currency, definite))
    names = [c.name for c in countries]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"world table: duplicate countries {duplicates}")
    return tuple(countries)


COUNTRIES: tuple[Country, ...] = _parse(_TABLE)
BY_NAME: dict[str, Country] = {c.name: c for c in COUNTRIES}


def split_countries(seed: int = 0, heldout_fraction: float = 0.3) -> tuple[list[Country], list[Country]]:
    """(trained, held_out): a seeded split, stratified by continent, each list in table order.

    Stratifying keeps every continent on both sides, so the held-out set is not, say, all African.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    rng = random.Random(seed)
    heldout_names: set[str] = set()
    for continent in CONTINENTS:
        names = sorted(c.name for c in COUNTRIES if c.continent == continent)
        rng.shuffle(names)
        heldout_names.update(names[: round(len(names) * heldout_fraction)])
    trained = [c for c in COUNTRIES if c.name not in heldout_names]
    heldout = [c for c in COUNTRIES if c.name in heldout_names]
    return trained, heldout
