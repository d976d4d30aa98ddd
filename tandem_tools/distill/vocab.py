"""Word lists the prompt templates are filled from. All written for this project (no benchmark data)."""

from __future__ import annotations


def _lines(block: str) -> tuple[str, ...]:
    return tuple(line.strip() for line in block.strip().splitlines() if line.strip())


_NAMES = """
Amara Ben Chen Dara Elif Farid Greta Hugo Ines Jonas Kavya Leo Mina Nico Olga Pedro Qiu Rosa Sami Tara Umar
Vera Wes Ximena Yusuf Zoe Aiko Bruno Carmen Diego Esme Felix Hana Ivan Jia Kofi Lena Mateo Nora Omar
"""
NAMES = tuple(_NAMES.split())

# ---- writing ----
TONES = _lines("""
formal
friendly
apologetic
enthusiastic
concise
polite but firm
warm and personal
professional
light-hearted
reassuring
""")
RECIPIENTS = _lines("""
your landlord
a new colleague
your whole team
a customer who left a complaint
your manager
a neighbour
your child's teacher
a supplier
a friend you have not seen in years
the local library
a hotel where you stayed last week
a job candidate
""")
EMAIL_PURPOSES = _lines("""
asking to move a meeting to next Thursday
requesting a refund for a damaged order
thanking them for their help with a project
announcing new office opening hours
inviting them to a neighbourhood clean-up day
reporting that the heating has stopped working
following up on a job application sent two weeks ago
declining an invitation to speak at a conference
asking for an extension on a deadline
introducing yourself before your first day
apologising for missing a call
proposing a weekly check-in
""")
LENGTHS = ("under 100 words", "in three short paragraphs", "in about five sentences", "briefly", "in about 150 words")
GENRES = _lines("""
mystery
science fiction
fairy tale
comedic
adventure
bedtime
historical
slice-of-life
ghost
heartwarming
""")
CHARACTERS = _lines("""
a retired lighthouse keeper
a curious robot
a shy baker
twin sisters who run a bookshop
a street musician
a lost dog
an astronaut on her first mission
a young inventor
a grumpy old cat
a night-shift nurse
a travelling tailor
a beekeeper
""")
EVENTS = _lines("""
finds a map hidden inside an old book
has to win back a friend's trust
discovers a door that was not there yesterday
loses their voice the day before a big performance
receives a letter addressed to someone who moved away long ago
must deliver a package across a flooded town
wakes up able to understand birds
accidentally swaps bags with a stranger
""")
SETTINGS = ("", " in a mountain village", " on a space station", " during a thunderstorm", " in a busy train station")
POEM_FORMS = _lines("""
haiku
limerick
four-line rhyming poem
short free-verse poem
sonnet
poem of three stanzas
""")
POEM_SUBJECTS = _lines("""
the first snow of winter
a city at night
an old bicycle
morning coffee
the ocean at dawn
an unlikely friendship
a forgotten garden
the last day of summer
a train journey
a lighthouse in fog
learning to swim
a grandmother's kitchen
""")
POEM_MOODS = ("", " in a hopeful tone", " with a melancholic mood", " for young children", " that makes people smile")
PRODUCTS = _lines("""
a stainless steel water bottle
noise-cancelling headphones
a handmade ceramic mug
a folding electric bicycle
a solar-powered phone charger
a weighted blanket
an ergonomic office chair
a cast-iron frying pan
a smart plant sensor
a waterproof hiking backpack
a mechanical keyboard
a reusable beeswax food wrap
""")
AUDIENCES = ("hikers", "students", "busy parents", "remote workers", "home cooks", "older adults", "gamers")
EMPHASES = ("", " highlighting durability", " focusing on comfort", " stressing value for money", " in a playful voice")
OCCASIONS = _lines("""
a best friend's wedding
a colleague's retirement party
the opening of a community garden
a school graduation
a grandparent's ninetieth birthday
the end of a successful project
""")

# ---- open questions ----
SCIENCE = _lines("""
photosynthesis
black holes
plate tectonics
vaccines
magnetism
the water cycle
DNA replication
climate change
the immune system
volcanoes
antibiotic resistance
the speed of light
earthquakes
the greenhouse effect
evolution by natural selection
static electricity
ocean tides
nuclear fusion in the sun
rainbows
the human heart
""")
HISTORY = _lines("""
the printing press
the Silk Road
the Industrial Revolution
the building of the Egyptian pyramids
the fall of the Western Roman Empire
the first moon landing
the invention of writing
the Black Death
the Renaissance in Italy
the age of sail
the abolition of slavery
the French Revolution
the invention of the telephone
the Ottoman Empire
the history of the Olympic Games
the Great Depression
""")
EVERYDAY = _lines("""
saving money each month
sleeping better
cooking rice on the stove
keeping houseplants alive
learning a new language as an adult
preparing for a job interview
organising a small kitchen
running a first 5 km race
reducing food waste at home
choosing a used car
keeping a budget for groceries
making friends in a new city
studying for exams
packing for a week-long trip
""")
MACHINES = _lines("""
a refrigerator
GPS navigation
a microwave oven
a touchscreen
bicycle gears
a jet engine
a solar panel
a lock and key
an elevator
Wi-Fi
a vaccine cold chain
a hydroelectric dam
a digital camera
noise-cancelling headphones
a thermostat
a credit card payment
""")
SOCIETY = _lines("""
inflation
democracy
supply and demand
public libraries
the stock market
minimum wage laws
recycling programmes
urban planning
compound interest
international trade
""")
TRANSLATION_LANGUAGES = ("French", "Spanish", "German")
