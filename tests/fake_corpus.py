"""A small corpus in the livedoor file format, for tests (the real one cannot be downloaded here).

Each category has its own words, so that a tiny model can learn to tell them apart; some lines
carry full-width characters, ideographic spaces and blank lines to exercise the preprocessing.

    python tests/fake_corpus.py --output_dir data/fake-text --articles_per_category 30
"""

from __future__ import annotations

import random
from pathlib import Path

from tap import Tap

CATEGORY_WORDS: dict[str, list[str]] = {
    "dokujo-tsushin": ["結婚", "恋愛", "女性", "独身", "彼氏", "婚活", "合コン", "アラサー"],
    "it-life-hack": ["パソコン", "ソフト", "ネットワーク", "セキュリティ", "クラウド", "サーバー", "データ", "アプリ"],
    "kaden-channel": ["家電", "テレビ", "冷蔵庫", "掃除機", "洗濯機", "エアコン", "電子レンジ", "カメラ"],
    "livedoor-homme": ["男性", "ビジネス", "転職", "年収", "スーツ", "時計", "上司", "営業"],
    "movie-enter": ["映画", "監督", "俳優", "公開", "上映", "女優", "主演", "劇場"],
    "peachy": ["美容", "ファッション", "コスメ", "スイーツ", "ダイエット", "ネイル", "ヘア", "カフェ"],
    "smax": ["スマートフォン", "アンドロイド", "端末", "通信", "ドコモ", "発売", "機種", "画面"],
    "sports-watch": ["野球", "サッカー", "選手", "試合", "優勝", "監督", "球団", "代表"],
    "topic-news": ["事件", "警察", "政治", "首相", "ネット", "話題", "批判", "騒動"],
}
# Articles per category in the real corpus (7,367 in all).
REAL_COUNTS = {
    "dokujo-tsushin": 870, "it-life-hack": 870, "kaden-channel": 864, "livedoor-homme": 511, "movie-enter": 870,
    "peachy": 842, "smax": 870, "sports-watch": 900, "topic-news": 770,
}  # fmt: skip
COMMON_WORDS = ["今日", "最近", "多く", "情報", "記事", "人気", "日本", "東京", "写真", "紹介"]
TEMPLATES = [
    "{a}について{b}の{c}が話題になっている。",
    "{common}では{a}と{b}が注目されている。",
    "{a}の{c}は{common}でも{b}だという。",
]


def make_sentence(rng: random.Random, words: list[str]) -> str:
    a, b, c = rng.sample(words, 3)
    return rng.choice(TEMPLATES).format(a=a, b=b, c=c, common=rng.choice(COMMON_WORDS))


def make_article(rng: random.Random, category: str, article_id: int) -> str:
    """The text of one article file: URL, date, title, then body lines."""
    words = CATEGORY_WORDS[category]
    url = f"http://news.livedoor.com/article/detail/{article_id}/"
    date = f"2012-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T12:00:00+0900"
    title = f"{rng.choice(words)}と{rng.choice(words)}の{rng.choice(COMMON_WORDS)}"
    body = [make_sentence(rng, words) for _ in range(rng.randint(2, 6))]
    # Preprocessing material: a leading ideographic space, a full-width alphanumeric word,
    # trailing spaces and blank lines that prepare.py must normalise or drop.
    body[0] = "\u3000" + body[0]
    if article_id % 3 == 0:
        body.insert(1, "")
        body.append(f"ＮＥＷＳ{article_id % 100}　 ")
    return "\n".join([url, date, title, *body]) + "\n"


def write_corpus(output_dir: Path, articles_per_category: int | dict[str, int] = 30, seed: int = 0) -> Path:
    """Write OUTPUT_DIR/<category>/<category>-<id>.txt + LICENSE.txt per category, README.txt, CHANGES.txt.

    articles_per_category: one count for all, or a count per category (e.g. REAL_COUNTS).
    """
    rng = random.Random(seed)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "README.txt").write_text("livedoor ニュースコーパス (fake)\n", encoding="utf-8")
    (output_dir / "CHANGES.txt").write_text("2014-02-09 fake\n", encoding="utf-8")
    article_id = 5000000
    for category in CATEGORY_WORDS:
        folder = output_dir / category
        folder.mkdir(exist_ok=True)
        (folder / "LICENSE.txt").write_text("http://creativecommons.org/licenses/by-nd/2.1/jp/\n", encoding="utf-8")
        count = articles_per_category if isinstance(articles_per_category, int) else articles_per_category[category]
        for _ in range(count):
            article_id += 1
            text = make_article(rng, category, article_id)
            (folder / f"{category}-{article_id}.txt").write_text(text, encoding="utf-8")
    return output_dir


class Args(Tap):
    output_dir: Path  # where to write the corpus (the layout of data/text)
    articles_per_category: int = 30  # articles written for each of the 9 categories
    seed: int = 0  # seed of the generated text


if __name__ == "__main__":
    args = Args().parse_args()
    write_corpus(args.output_dir, args.articles_per_category, args.seed)
    print(f"wrote {9 * args.articles_per_category} articles to {args.output_dir}")
