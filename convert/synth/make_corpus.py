"""Regenerate corpus.txt, the text the synthetic tokenizer's BPE is trained on.

Run `python -m convert.synth.make_corpus` after editing the fragments; the output is committed
so training never depends on this script. All text here is original. Seeded, so the same
fragments always give the same bytes.
"""

from __future__ import annotations

import random
from pathlib import Path

SEED = 46
TARGET_BYTES = 320_000

SUBJECTS = ["The old ferry", "A tired courier", "Our new compiler", "The river town", "Every small lamp",
            "A patient gardener", "The night train", "My neighbour's cat", "The weather station",
            "A quiet library", "The orchestra", "This little robot", "The harbour crane", "A young cartographer",
            "The village baker", "An unfinished bridge", "The test suite", "A borrowed bicycle"]
VERBS = ["waited beside", "drifted past", "carefully measured", "quietly repaired", "painted", "counted",
         "wandered through", "argued about", "photographed", "ignored", "slowly rebuilt", "returned to",
         "described", "compressed", "sorted", "illuminated", "forgot about", "listened to"]
OBJECTS = ["the copper roofs", "seven wooden crates", "the morning fog", "a map of the coast", "the noisy market",
           "every unread letter", "the frozen canal", "a stack of invoices", "the broken clock tower",
           "the spring festival", "two hundred pixels", "the final chapter", "a field of sunflowers",
           "the tangled cables", "the midnight schedule", "an empty stadium", "the lighthouse keeper"]
TAILS = ["before dawn", "without a word", "for the third time this week", "while the kettle boiled",
         "under a violet sky", "as the rain began", "long after everyone left", "with surprising grace",
         "despite the warnings", "in exactly four minutes", "near the northern gate", "just in case"]
OPENERS = ["However,", "Meanwhile,", "In the end,", "Strangely enough,", "By Tuesday,", "Of course,",
           "Later that evening,", "Without hesitation,", "At first glance,", "Eventually,"]
PROSE = [
    "Nobody expected the storm to last, yet it stayed for nine days and rearranged the dunes.",
    "She kept a notebook of every sound the house made, and by winter it was thicker than a dictionary.",
    "The recipe asks for two eggs, a pinch of salt, and more patience than most people own.",
    "If the signal drops below the threshold, the receiver waits, listens, and tries again.",
    "He measured the room twice, wrote both numbers down, and still bought the wrong carpet.",
    "Clouds gathered over the valley like sheep that had forgotten where the gate was.",
    "The museum's newest exhibit is a single chair, lit from above, surrounded by silence.",
    "Most bugs are not clever; they are simply patient, waiting for the one input nobody tried.",
    "We walked along the pier, counting gulls, until the numbers stopped making sense.",
    "The committee approved the plan on the condition that nobody would ever mention it again.",
    "A good index is like a good friend: it tells you where things are without asking why.",
    "Half the town turned out for the parade; the other half watched it from their balconies.",
    "The printer jammed, the coffee spilled, and the deadline moved forward by an hour.",
    "Her garden grew tomatoes, mint, and an alarming number of volunteer pumpkins.",
    "Every map is a small lie told in the service of a larger truth.",
    "Can you hear that? It's the fridge again, humming the same three notes it always hums.",
    "\"Don't worry,\" said the pilot, \"we've landed here before, mostly on purpose.\"",
    "It's not that I'm late; it's that the clocks in this building disagree with each other.",
    "They'd planned a picnic, but the ants had planned one too, and the ants were better organised.",
    "We're testing whether the model handles apostrophes: isn't, won't, they'll, you've, I'd.",
    "The café on the corner serves crème brûlée, naïve optimism, and surprisingly good jalapeño bread.",
    "Résumé, façade, coöperate, Zürich, São Paulo, Kraków, and Reykjavík all need accented letters.",
]
NUMERIC = ["The invoice total was ${a}.{b:02d}, due on 2026-{m:02d}-{d:02d}.",
           "Sensor {a} reported {b}.{c} degrees at {h:02d}:{mi:02d}:{s:02d} UTC.",
           "Order #{a}{b} shipped {c} boxes, {d} pallets, and {e}% of the backlog.",
           "Version {a}.{b}.{c} fixed {d} issues and introduced {e} new ones.",
           "Call +1 ({a}) {b}-{c:04d} or visit room {d}{e}.",
           "Coordinates: {a}.{b:04d}° N, {c}.{d:04d}° E, altitude {e} m.",
           "The ratio settled at {a}:{b} after {c} iterations and {d}.{e} seconds."]
CODE = [
    "def add(a, b):\n    \"\"\"Return the sum of a and b.\"\"\"\n    return a + b\n",
    "for i in range(10):\n    if i % 3 == 0:\n        print(f\"fizz {i}\")\n    else:\n        continue\n",
    "class Queue:\n    def __init__(self):\n        self._items = []\n\n    def push(self, x):\n        self._items.append(x)\n",
    "int main(void) {\n    int total = 0;\n    for (int k = 0; k < 64; ++k) {\n        total += k * k;\n    }\n    return total;\n}\n",
    "const greet = (name) => {\n  return `Hello, ${name}!`;\n};\nconsole.log(greet(\"world\"));\n",
    "SELECT id, name, created_at\nFROM users\nWHERE active = 1\nORDER BY created_at DESC\nLIMIT 20;\n",
    "$ git status --short\n$ ls -la /tmp/build && make -j2 2>&1 | tee build.log\n",
    "{\n  \"name\": \"demo\",\n  \"version\": \"0.1.0\",\n  \"tags\": [\"alpha\", \"beta\"],\n  \"enabled\": true\n}\n",
    "fn main() {\n    let v: Vec<u32> = (1..=5).map(|x| x * 2).collect();\n    println!(\"{:?}\", v);\n}\n",
    "<div class=\"card\">\n  <h2>Title</h2>\n  <p>Some <em>emphasis</em> here.</p>\n</div>\n",
    "if [ -z \"$HOME\" ]; then\n\techo \"no home\" >&2\n\texit 1\nfi\n",
    "matrix = [[0] * 4 for _ in range(4)]\nmatrix[2][3] = -1.5e-3\nassert sum(map(sum, matrix)) < 0\n",
    "# TODO: handle the empty case\nresult = {k: v for k, v in pairs if v is not None}\n",
    "x = np.zeros((3, 224, 224), dtype=np.float32)\ny = torch.from_numpy(x).unsqueeze(0)\n",
]
ZH_WHEN = ["今天早上", "昨天晚上", "上个星期", "下雨的时候", "春节前", "周末", "半夜", "放学以后", "在山顶上", "在公园里",
           "在火车上", "在厨房里", "去年夏天", "每个月初", "考试结束后", "会议开始前"]
ZH_SUBJ = ["小明", "我们的老师", "这座城市", "那只小猫", "研究小组", "邻居家的孩子", "图书馆管理员", "年轻的工程师",
           "山上的农民", "这家小店", "我的奶奶", "新来的同事", "火车站", "天文爱好者", "王阿姨", "一位画家", "两个学生",
           "船长", "机器人", "老李"]
ZH_HOW = ["", "又", "高兴地", "偷偷地", "认真地", "慢慢地", "一起", "忽然", "终于", "差点儿", "小心翼翼地", "仔细地"]
ZH_VERB = ["正在整理", "看了", "修好了", "都会检查", "读完了", "打开了",
           "非常喜欢", "重新设计了", "在雨中寻找", "记录了", "带走了", "第一次尝试了", "画了", "忘记了",
           "讨论了", "拍下了", "清洗了", "数了数"]
ZH_OBJ = ["一本旧书", "窗外的风景", "厨房里的水壶", "桌上的地图", "那封没有寄出的信", "花园里的向日葵", "新的计算机程序",
          "湖边的小船", "晚上的星空", "一杯热茶", "整个项目的计划", "墙上的时钟", "冬天的第一场雪", "五个红苹果",
          "一张老照片", "河边的石头", "所有的钥匙", "一首新歌", "实验数据", "门口的自行车"]
ZH_TAIL = ["，然后笑了起来。", "，大家都觉得很奇怪。", "。", "，因为明天要下雨。", "，花了整整三个小时。",
           "，这让所有人都很惊讶。", "，但是什么也没有发现。", "，心情变得好多了。", "！", "？", "；"]
JA_SUBJ = ["私は", "田中さんは", "子どもたちは", "先生が", "猫が", "友だちと", "兄は", "店長は", "研究者たちは", "おばあちゃんは"]
JA_OBJ = ["新しい本を", "古い地図を", "朝ごはんを", "駅前の花を", "冷たい水を", "小さな箱を", "手紙を", "写真を", "星空を",
          "プログラムを", "ケーキを", "時計を"]
JA_VERB = ["読みました", "探しています", "作りたい", "忘れてしまった", "見つけた", "片付けました", "描いている", "買いに行く",
           "ゆっくり眺めた", "直しました"]
JA = ["今日はとても良い天気ですね。", "駅の近くに新しいパン屋ができました。", "このプログラムはまだ完成していません。",
      "猫が窓のそばで静かに眠っている。", "明日の会議は午後三時からです。", "山の上から見る景色は本当に美しい。",
      "カタカナのテスト：コンピューター、ネットワーク、データベース。", "雨が降りそうなので、傘を持って行きましょう。",
      "彼女は毎朝コーヒーを飲みながら新聞を読む。", "ひらがなとカタカナと漢字をまぜて書きます。"]
KO = ["오늘은 날씨가 정말 좋네요.", "도서관에서 새로운 책을 빌렸습니다.", "이 프로그램은 아직 테스트 중입니다.",
      "고양이가 창가에서 조용히 자고 있어요.", "내일 아침 일곱 시에 만나요.", "바다를 보면 마음이 편해집니다.",
      "한글은 아름답고 과학적인 문자입니다.", "커피 한 잔 하실래요?"]
OTHER = ["Привет, как дела? Сегодня мы тестируем токенизатор.", "Καλημέρα! Η θάλασσα είναι ήρεμη σήμερα.",
         "مرحبا بالعالم، هذا نص تجريبي.", "नमस्ते, यह एक छोटा परीक्षण वाक्य है।", "Xin chào, hôm nay trời đẹp quá.",
         "Ça va très bien, merci ! Où est la gare ?", "Größe, Straße, Mädchen und Übermut.", "¿Dónde está la biblioteca? ¡Allí!"]
EMOJI = ["🙂", "🚀", "🌧️", "🍵", "📦", "✅", "❌", "🐈", "🎉", "👍🏽", "👩‍💻", "🇯🇵", "❤️", "🔥", "⭐", "🧪", "…", "—", "→", "±", "∑", "√", "©"]
SYLL = ["ka", "lo", "ven", "dra", "mi", "tor", "sel", "qu", "an", "bre", "zi", "ul", "nor", "pha", "est", "ri", "mon", "th",
        "gar", "is", "vel", "osk", "ne", "tha", "rum", "bi", "cor", "fen", "ya", "lith", "ox", "dun", "sa", "mer", "wyn",
        "ak", "pel", "tro", "hes", "ium", "gl", "ev", "ran", "sko", "ju", "ber", "ta", "cel", "fo", "nix", "pra", "um",
        "dor", "ke", "sul", "vo", "ash", "li", "gre", "mat", "ces", "hun", "op", "rel", "zon", "ey", "bla", "ti", "kor"]
KINDS = ["river port", "hill town", "fishing village", "market city", "mining camp", "island", "valley", "mountain pass",
         "monastery", "university town", "border fort", "salt marsh", "glacier lake", "railway junction"]
ADJS = ["windy", "sleepy", "prosperous", "forgotten", "crowded", "tiny", "ancient", "modern", "remote", "colourful",
        "foggy", "quiet", "famous", "half-flooded"]
KNOWN_FOR = ["copper bells", "blue cheese", "its annual kite contest", "stubborn goats", "a leaning clock tower",
             "excellent bread", "strange local laws", "the longest staircase in the region", "glass-blowing",
             "night markets", "migrating cranes", "a library with no doors", "hot springs", "wooden boats"]


def _word(r: random.Random) -> str:
    return "".join(r.choice(SYLL) for _ in range(r.randint(2, 4)))


def _gazetteer(r: random.Random) -> str:
    name, region = _word(r).capitalize(), _word(r).capitalize()
    adj = r.choice(ADJS)
    s = (f"{name} is {'an' if adj[0] in 'aeiou' else 'a'} {adj} {r.choice(KINDS)} in the province of {region}, known for {r.choice(KNOWN_FOR)}. "
         f"It was founded in {r.randint(1100, 1990)} and has about {r.randint(2, 900) * 100:,} inhabitants.")
    if r.random() < 0.6:
        s += f" Locals call the {r.choice(['main square', 'old bridge', 'harbour', 'north road'])} \"{_word(r)} {_word(r)}\"."
    if r.random() < 0.8:
        s += f" The nearest neighbours are {_word(r).capitalize()}, {_word(r).capitalize()} and {_word(r).capitalize()}."
    return s


def _english(r: random.Random) -> str:
    s = f"{r.choice(SUBJECTS)} {r.choice(VERBS)} {r.choice(OBJECTS)} {r.choice(TAILS)}."
    if r.random() < 0.4:
        s = f"{r.choice(OPENERS)} {s[0].lower()}{s[1:]}"
    if r.random() < 0.3:
        s += f" {_word(r).capitalize()} of {_word(r).capitalize()} called it {_word(r)}."
    return s


def _chinese(r: random.Random) -> str:
    return "".join(r.choice(x) for x in (ZH_WHEN, ZH_SUBJ, ZH_HOW, ZH_VERB, ZH_OBJ, ZH_TAIL))


def _japanese(r: random.Random) -> str:
    if r.random() < 0.3:
        return r.choice(JA)
    return "".join(r.choice(x) for x in (JA_SUBJ, JA_OBJ, JA_VERB)) + r.choice(["。", "！", "よ。", "ね。"])


def _numeric(r: random.Random) -> str:
    v = dict(a=r.randint(1, 9999), b=r.randint(0, 99), c=r.randint(0, 9999), d=r.randint(1, 28), e=r.randint(0, 100),
             m=r.randint(1, 12), h=r.randint(0, 23), mi=r.randint(0, 59), s=r.randint(0, 59))
    return r.choice(NUMERIC).format(**v)


def _paragraph(r: random.Random) -> str:
    kind = r.random()
    if kind < 0.25:
        parts = [_english(r) if r.random() < 0.6 else r.choice(PROSE) for _ in range(r.randint(2, 5))]
        if r.random() < 0.3:
            parts.insert(r.randrange(len(parts) + 1), r.choice(EMOJI))
        return " ".join(parts)
    if kind < 0.37:
        return " ".join(_gazetteer(r) for _ in range(r.randint(1, 3)))
    if kind < 0.53:
        names = sorted({_word(r).capitalize() for _ in range(r.randint(20, 40))})
        return f"Index of places ({names[0][0]}–{names[-1][0]}): " + ", ".join(names) + "."
    if kind < 0.62:
        return "".join(_chinese(r) for _ in range(r.randint(2, 5)))
    if kind < 0.70:
        return "".join(_japanese(r) for _ in range(r.randint(2, 4)))
    if kind < 0.74:
        return " ".join(r.sample(KO, r.randint(1, 3)))
    if kind < 0.78:
        return r.choice(OTHER) + " " + r.choice(EMOJI)
    if kind < 0.86:
        return " ".join(_numeric(r) for _ in range(r.randint(1, 3)))
    if kind < 0.95:
        return r.choice(CODE).rstrip("\n")
    # whitespace runs: aligned columns, tabs, trailing spaces
    rows = [f"{_word(r):<12}{r.randint(0, 999):>6}\t{r.choice(EMOJI)}   " for _ in range(r.randint(2, 4))]
    return "\n".join(rows)


def make_corpus() -> str:
    r = random.Random(SEED)
    out, size = [], 0
    while size < TARGET_BYTES:
        p = _paragraph(r)
        sep = r.choice(["\n\n", "\n\n", "\n", "\n\n\n", "\r\n"])
        out.append(p + sep)
        size += len((p + sep).encode("utf-8"))
    return "".join(out)


if __name__ == "__main__":
    path = Path(__file__).with_name("corpus.txt")
    path.write_bytes(make_corpus().encode("utf-8"))
    print(f"wrote {path} ({path.stat().st_size} bytes)")
