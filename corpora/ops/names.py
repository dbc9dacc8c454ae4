"""Lexicons for the person-name recognizer of ``pii.py`` (Python constants: nothing to load at run time).

Kept apart from the logic so that a reviewer can extend a list without reading the recognizer, and so the
benchmark generator (``scripts/make_pii_bench.py``) can be checked not to import them.
"""

from __future__ import annotations

# ---------------------------------------------------------------------------------------- surnames

COMPOUND_SURNAMES = frozenset(
    "欧阳 司马 诸葛 上官 东方 皇甫 尉迟 公孙 慕容 长孙 宇文 司徒 令狐 夏侯 轩辕 端木 独孤 南宫 西门 呼延 "
    "申屠 澹台 公冶 太史 百里 钟离 闻人 赫连 万俟 司空 拓跋 第五 濮阳 单于 左丘 东郭 淳于 仲孙 叔孙 "
    "谷梁 宰父 夹谷 巫马 公羊 梁丘 公西 漆雕 乐正 壤驷 公良 段干 亓官 司寇 子车 颛孙 羊舌 微生 "
    "东门 鲜于 闾丘 南门 钟吕".split())

SINGLE_SURNAMES = frozenset(
    "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘蒋蔡余杜叶程苏魏吕丁任沈姚"
    "卢姜崔钟谭陆汪范金石廖贾夏韦付方白邹孟熊秦邱江尹薛闫段雷侯龙史陶黎贺顾毛郝龚邵万钱严覃武戴莫孔汤"
    "向常温康施文牛樊葛邢安齐易乔伍庞颜倪庄聂章鲁岳翟殷詹申欧耿关兰焦俞左柳甘祝包宁尚符舒阮纪梅童凌"
    "毕单季裴霍涂成苗谷盛曲翁冉骆蓝路游辛靳管柴蒙鲍华喻祁蒲房滕屈饶解牟艾尤阳时穆农司卓古吉缪简车项"
    "连芦麦褚娄窦戚岑景党宫费卜冷晏席卫米柏宗瞿桂全佟应臧闵苟邬边卞姬师和仇栾隋商刁沙荣巫寇桑郎甄丛"
    "仲虞敖巩明佘池查麻苑迟邝官封谈匡鞠惠荆乐冀郁胥南班储原栗燕楚鄢劳谌奚皮粟冼蔺楼盘满闻位厉伊仝区"
    "郜海阚花权强帅屠豆朴盖练廉禹井祖漆巴丰支卿国狄平计索宣晋相初门云容敬来扈晁芮都普阙浦戈伏鹿薄邸"
    "雍辜羊阿乌母裘亓修邰赫杭况那宿鲜印逯隆茹诸战慕危玉银亢嵇公哈湛宾戎勾茅利於呼居揭干但尉冶斯元束"
    "檀衣信展阴昝智幸奉植衡富尧闭由于阎"
    # less common ones seen in customer files
    "郦钮逄隗璩濮扶堵宦鱼庾暨殳沃蔚夔厍晁訾毋乜鄂蒯笪郗佴暴琚钦缑竺桓汝墨谯禄颜邴茆蓟隽郏鄞"
    # the rest of the Hundred Family Surnames (百家姓) less those that are everyday words or function
    # characters (水 家 松 山 秋 从 咸 籍 能 双 通 别 充 习 终 步 广 东 空 养 须 后 红 益 经)
    "昌凤酆傅萧贝柯贲洪滑荀羿汲糜弓牧宓蓬仰钭韶怀赖苍莘贡宰郤寿慎弘越融巢")

# ------------------------------------------------------------------------------ given-name filters

# characters (practically) never inside a given name: a candidate containing one is not a name
NOT_GIVEN = frozenset(
    "的了在是于与及或等将已未被把对向从因为而且也都就还又再所其此该本各每某这那哪谁什么年日时分秒"
    "号亿个名款项笔期率额户账卡证码省市区县乡村路街巷弄楼室层门银行司厂店部处科局院会社团队组"
    "说称表示要需拟请签申办来去到经曾欠逾借贷收付转存取开销挂补填登留预约回联告问答打拨投诉认否拒"
    "先女您你我他她它们啊吗呢吧哦嗯喂好谢感系现目妻配偶父母亲属客人员面上下前后内外今近当次"
    "以自通过提持确咨反核查询审批复同意均即仍并但则虽无没不非很最更较太"
    "职住用划制电访续序台域务作产品资财险税费债息况情负共担陪"
    "至给让叫据核手机址邮箱附件抄送收话座固网额")

# a name may end right before one of these characters ...
BOUNDARY_CHARS = NOT_GIVEN | frozenset("和同名先女生之月中会发营金元万主真传镇栋士可")
# ... or right before one of these words (a name followed by 手机 / 身份证 / 表示 ...)
FOLLOW_WORDS = frozenset(
    "手机 电话 座机 固话 身份 证件 联系 现住 家住 住址 户籍 名下 本人 签字 签名 确认 表示 称其 声称 反映 来电 致电 "
    "要求 申请 办理 持有 作为 同意 拒绝 接听 夫妇 一家 父子 母女 父女 母子 介绍 回复 告知 陈述 承认 否认 签收 领取 "
    "提供 负责 承诺 担保 实地 经营 出具 认为 说明 解释 提出 答复 坦言 核实 参与 陪同 进行 完成 提交 填写 报送 "
    "复核 审核 审批 审计 访谈 约定 借款 还款 逾期 欠款 转账 汇款 收到 支付 存入 取出 开立 开户 注销 挂失 "
    "邮箱 微信 地址 工号 编号 职务 岗位 部门 所在 所属 之妻 之夫 之子 之女 夫妻 兄弟 姐妹 等人 二人 三人 "
    "于是 随后 当即 立即 多次 曾经 目前 现在 已经 没有 也是 还是 就是 一起 一同 共同 分别 汇报 发言 主持 出席 列席 "
    "签批 批示 到场 在场 陪同 配合 协助 负责 联络 对接 带领 牵头".split())

# words that start with a surname character but are never names: a candidate that is one of them, or
# starts with one and is no longer than it, is rejected (黄金 in 黄金业务; 黄金凤 alone may still be a name)
NOT_NAME_WORDS = frozenset(
    "经理 王府井 王府 信息 关系 方面 方式 方案 方向 方法 余额 金额 黄金 金融 高级 高端 高新 高管 高速 高于 高温 "
    "高价 高效 高度 高层 高中 高考 高铁 高额 高息 高利 高危 高龄 高峰期 周一 周二 周三 周四 周五 周六 周日 周天 明白 "
    "车牌 游泳 伍拾 伍佰 伍万 陆拾 陆佰 陆万 海尔 成功 成立 成本 成员 成交 成熟 成长 成果 "
    "安全 安排 安装 安置 文件 文化 文字 文本 文员 文书 明确 明细 明显 明天 明年 常规 常年 常见 常用 常务 常委 "
    "车辆 车贷 车位 车险 车间 车主 房产 房贷 房屋 房租 房价 房东 全部 全额 全面 全行 全国 全体 全资 商户 商业 "
    "商品 商务 商量 商铺 商城 商标 商贸 商行 利息 利率 利润 利用 利于 利益 华为 华夏 华润 华侨 华南 华北 华东 "
    "华中 华西 江苏 江西 湖南 湖北 广东 广西 海南 海外 海关 云南 贵州 宁夏 福建 平台 平均 平时 平稳 平衡 平等 "
    "平方 建设 工商 农业 农村 农户 农商 交通 招商 民生 兴业 光大 浦发 中信 邮储 国有 国家 国内 国际 国库 国债 "
    "国外 姓名 性别 电话 手机 地址 邮箱 身份 职业 单位 单笔 单独 单据 单价 名称 万元 万一 万科 包括 包含 包装 "
    "管理 管控 简称 简单 简历 司法 司机 时间 时候 时期 时效 时任 应当 应该 应收 应付 应急 应用 应对 连续 连带 "
    "段时 任何 任务 任职 曾经 孔子 齐全 向其 于其 宋体 严重 严格 居住 居民 居然 居委 常住 信用 信贷 信托 信箱 "
    "信封 信任 信心 信号 计划 计算 计息 计提 计入 计费 计价 计量 强制 强调 强化 强度 钱款 钱包 毛利 谈话 谈判 "
    "谈及 解释 解除 解决 解读 程序 程度 卫生 卫星 来电 来访 来源 来往 来自 陆续 初步 初始 初审 初次 初期 相关 "
    "相应 相互 相同 相比 相当 相似 相符 宣传 宣布 宣告 容易 容量 危险 危机 危害 修改 修复 修订 修理 印章 印刷 "
    "区域 区分 经营 石化 石油 向日葵 黄金周 周黑鸭 高德 周末 周期 周转 周边 周年 关于 关注 关联 关键 关闭 关爱 "
    "支付 支持 支行 支出 支票 支撑 左右 左侧 公司 公积 公安 公证 公告 公开 公众 公务 公章 公布 公示 公正 公平 "
    "公共 公寓 公里 公斤 付款 付息 申请 申报 申诉 都是 都有 都要 都能 都会 那么 那些 那个 那里 师傅 和解 和谐 "
    "蓝色 红色 白色 黄色 金色 黑色 龙头 景区 景观 路段 路口 路费 路由 路线 路况 路边 丰富 丰收 项目 项下 区间 "
    "双方 保险 保证 保管 于是 由于 由此 元旦 米兰 岳父 岳母 冷链 冷库 童装 时任 后续 后期 焦点 焦虑 雷同 庞大 "
    "党员 党委 党支部 原因 原来 原告 原件 原价 原始 原有 原则 原本 原定 原料 门口 门店 门诊 门槛 门票 门面 "
    "满意 满足 满额 满期 楼盘 楼层 楼宇 楼市 楼房 盘点 盘活 晋升 晋级 乐观 乐意 索赔 索取 索要 索引 普通 普惠 "
    "普及 普遍 薄弱 羊毛 阿姨 母亲 母公司 宿舍 诸多 诸如 战略 玉米 银联 银行 银座 宾馆 呼叫 但是 元素 衣服 衣物 "
    "展示 展期 展业 展览 智能 智慧 幸运 幸好 富裕 闭环 由来 钟表 钟点 严肃 武装 颜色 章程 尚未 尚需 尚有 尚可 "
    "符合 舒适 纪律 纪要 童年 凌晨 毕业 季度 季末 涂料 苗木 盛行 曲线 蓝天 游客 游戏 辛苦 华丽 艾滋 尤其 尤为 "
    "阳台 卓越 古城 吉祥 费用 费率 席位 宗旨 边缘 边境 边界 查询 查看 查验 查封 查处 麻烦 迟延 迟到 迟缓 官方 "
    "官网 官员 封闭 封存 封面 储蓄 储备 储值 劳动 劳务 劳保 皮鞋 皮革 位于 位置 权利 权益 权限 权责 盖章 练习 "
    "廉洁 廉价 祖国 祖籍 戴帽 汤圆 鲁菜 施工 施行 康复 温度 温馨 易于 庄园 殷实 祝贺 祝福 宁可 宁愿 宁静 甄别 "
    "甄选 仲裁 巩固 迟迟 惠及 惠民 班车 班组 燕窝 海洋 海运 花费 花园 花卉 豆浆 朴素 井下 伊始 卜卦 穆斯林 "
    # letter closings that start with a surname character (顺祝商祺, 祝好)
    "祝商祺 祝时祺 祝安好 祝工作 祝您 祝好 敬礼 敬上 敬启 谨上".split())
# place names (and a few words) that are also plausible personal names: not a person unless the context
# says so (先生/女士 after it, or it alone fills a labelled field); a place suffix after it (市, 分行 ...) never
AMBIGUOUS_NAME_WORDS = frozenset(
    "高峰 金华 常熟 温州 苏州 杭州 柳州 兰州 贺州 郑州 常州 徐州 梅州 宁波 石家庄 黄山 马鞍山 高邮 海宁 张家港 "
    "韩城 钟祥 雷州 安庆 武汉 龙岗 白云 高明 江宁 金山 余杭 马尾 曹妃甸 文山 平安 文明 高山 杨梅 长城 方正 "
    "明月 国庆 建国 和平 胜利 幸福 阳光 东风 长江 黄河 金坛 金湖 高淳 高安 高州 江门 江阴 温岭 常德 黄冈 黄石 "
    "许昌 周口 商丘 安阳 焦作 洛阳 邢台 邯郸 保定 唐山 沧州 衡水 承德 包头 银川 西宁 昆明 贵阳 南宁 海口 广州 "
    "深圳 珠海 汕头 佛山 东莞 中山 惠州 湛江 茂名 福州 厦门 泉州 漳州 龙岩 南昌 九江 赣州 上饶 长沙 湘潭 衡阳 "
    "岳阳 成都 宜宾 乐山 南充 遵义 曲靖 大理 丽江 西安 宝鸡 咸阳 延安 汉中 榆林 太原 大同 晋中 运城 临汾 长治 "
    "济南 青岛 烟台 潍坊 临沂 淄博 济宁 泰安 威海 日照 乐清 合肥 芜湖 蚌埠 阜阳 宿州 滁州 六安 宣城 池州 南京 无锡 "
    "南通 扬州 镇江 泰州 盐城 淮安 连云港 宿迁 昆山 太仓 宜兴 溧阳 丹阳 如皋 海门 嘉兴 湖州 绍兴 台州 丽水 衢州 "
    "舟山 义乌 诸暨 瑞安 乐清 慈溪 余姚 桐乡 沈阳 大连 鞍山 抚顺 丹东 锦州 营口 辽阳 盘锦 铁岭 长春 吉林 四平 "
    "通化 松原 白城 延吉 大庆 伊春 黑河 绥化 海淀 丰台 石景山 通州 顺义 昌平 房山 平谷 密云 延庆 黄浦 徐汇 长宁 "
    "静安 普陀 虹口 杨浦 闵行 宝山 嘉定 浦东 松江 青浦 奉贤 崇明 上城 拱墅 滨江 萧山 临平 钱塘 富阳 临安 桐庐 "
    "建德 鹿城 龙湾 瓯海 婺城 金东 兰溪 东阳 永康 武义 浦江 南山 福田 罗湖 宝安 龙华 坪山 光明 盐田 天河 越秀 "
    "海珠 荔湾 番禺 花都 南沙 增城 江汉 江岸 汉阳 武昌 青山 洪山 蔡甸 江夏 黄陂 新洲 长安 桥西 新华 裕华 鹿泉 "
    "栾城 正定 高邑 江北 吴江 吴中 吴兴 武进 晋城 燕郊 楚雄 桂林 玉林 玉溪 娄底 邵阳 荆门 荆州 宜昌 孝感 "
    "常山 武夷 黄岩 路桥 温江 龙泉 云和 庆元 景宁 平湖 海盐 嘉善 安吉 德清 长兴 文成 泰顺 苍南 平阳 永嘉 洞头 "
    "龙游 江山 开化 岱山 嵊泗 天台 仙居 三门 玉环 临海".split())
# compound surnames that are (almost) never anything else: with 1-2 given characters they are a name
# even without a cue (东方, 西门, 第五, 百里, 司空, 单于, 濮阳 are ordinary words or places, so not here)
DISTINCTIVE_COMPOUND_SURNAMES = frozenset(
    "欧阳 司马 诸葛 上官 皇甫 尉迟 公孙 慕容 长孙 宇文 司徒 令狐 夏侯 轩辕 端木 独孤 南宫 呼延 申屠 澹台 钟离 "
    "闻人 赫连 万俟 拓跋 东郭 淳于 公冶 太史 左丘 仲孙 叔孙 宰父 巫马 公羊 梁丘 公西 漆雕 乐正 颛孙 鲜于 闾丘".split())

# single surnames that are also everyday function words (向银行, 于近日, 和客户): taken only in strong contexts
FUNCTION_WORD_SURNAMES = frozenset("向于和时应都那全以来可由成将从及与把对被在为所其之是把")

NOT_NAME_LENGTHS = tuple(sorted({len(w) for w in NOT_NAME_WORDS}, reverse=True))
AMBIGUOUS_LENGTHS = tuple(sorted({len(w) for w in AMBIGUOUS_NAME_WORDS}, reverse=True))

# first characters that never start a name even when the surname lexicon is not consulted (fallback)
NOT_NAME_START = NOT_GIVEN | frozenset("无暂待略详见同该本此如若某其各另双对家亲朋邻")
# two- and three-character words that fill a labelled field but are not names (联系人：本人)
NOT_NAME_FIELD_WORDS = frozenset(
    "本人 客服 柜台 同上 未知 不详 暂无 待定 无 略 见附件 家属 亲属 朋友 同事 邻居 保安 司机 前台 物业 门卫 保姆 "
    "总经理 董事长 财务 会计 出纳 法务 行长 主任 经理 经办 主管 负责人 员工 职员 业务员 客户 借款人 担保人 "
    "全体 双方 各方 大家 众人 他人 本行 我行 贵行 我司 贵司 本公司 其他 其它 另一 对方 男 女 先生 女士 "
    "丈夫 妻子 爱人 父亲 母亲 儿子 女儿 哥哥 姐姐 弟弟 妹妹 老公 老婆".split())

# --------------------------------------------------------------------------------------- romanised

# pinyin surnames (lower case), including compound ones written as one word
PINYIN_SURNAMES = frozenset(
    "wang li zhang liu chen yang huang zhao wu zhou xu sun ma zhu hu guo he gao lin luo zheng liang xie song tang "
    "han feng deng cao peng zeng xiao tian dong yuan pan yu jiang cai du ye cheng su wei lv lyu lu ding ren shen "
    "yao jia xia fu fang bai zou meng qin qiu hou yin xue yan lei long shi tao gu mao hao gong shao wan qian dai "
    "tan kong mo xiang chang wen kang niu fan ge xing an qi yi qiao wu pang ni zhuang nie zhan yue zhai "
    "geng guan lan jiao zuo liu gan zhu bao ning shang shu ruan ji mei tong ling bi shan cui zhong ke jin "
    "sima ouyang zhuge shangguan dongfang huangfu yuchi gongsun murong zhangsun yuwen situ linghu xiahou "
    "duanmu dugu nangong ximen huyan shentu zhongli wenren sikong baili helian tuoba "
    "lau chan wong cheung leung ng ho lam tsang kwok yeung tse chow chiu lai fung yip tang cheng choi chu "
    "tsui kwan lo kong mak kwong hui siu poon yiu ko ip tam fong yuen mok hung chung lui kam szeto au lee choy "
    "ngai cheuk lok".split())

# valid pinyin syllables (toneless, lower case; v and ü both accepted as u-umlaut)
PINYIN_SYLLABLES = frozenset(
    "a ai an ang ao ba bai ban bang bao bei ben beng bi bian biao bie bin bing bo bu ca cai can cang cao ce cen "
    "ceng cha chai chan chang chao che chen cheng chi chong chou chu chua chuai chuan chuang chui chun chuo ci "
    "cong cou cu cuan cui cun cuo da dai dan dang dao de dei den deng di dia dian diao die ding diu dong dou du "
    "duan dui dun duo e ei en eng er fa fan fang fei fen feng fo fou fu ga gai gan gang gao ge gei gen geng gong "
    "gou gu gua guai guan guang gui gun guo ha hai han hang hao he hei hen heng hong hou hu hua huai huan huang "
    "hui hun huo ji jia jian jiang jiao jie jin jing jiong jiu ju juan jue jun ka kai kan kang kao ke ken keng "
    "kong kou ku kua kuai kuan kuang kui kun kuo la lai lan lang lao le lei leng li lia lian liang liao lie lin "
    "ling liu long lou lu luan lun luo lv lve lyu lue ma mai man mang mao me mei men meng mi mian miao mie min "
    "ming miu mo mou mu na nai nan nang nao ne nei nen neng ni nian niang niao nie nin ning niu nong nou nu nuan "
    "nuo nv nve nyu nue o ou pa pai pan pang pao pei pen peng pi pian piao pie pin ping po pou pu qi qia qian "
    "qiang qiao qie qin qing qiong qiu qu quan que qun ran rang rao re ren reng ri rong rou ru ruan rui run ruo "
    "sa sai san sang sao se sen seng sha shai shan shang shao she shei shen sheng shi shou shu shua shuai shuan "
    "shuang shui shun shuo si song sou su suan sui sun suo ta tai tan tang tao te teng ti tian tiao tie ting tong "
    "tou tu tuan tui tun tuo wa wai wan wang wei wen weng wo wu xi xia xian xiang xiao xie xin xing xiong xiu xu "
    "xuan xue xun ya yan yang yao ye yi yin ying yo yong you yu yuan yue yun za zai zan zang zao ze zei zen zeng "
    "zha zhai zhan zhang zhao zhe zhei zhen zheng zhi zhong zhou zhu zhua zhuai zhuan zhuang zhui zhun zhuo zi "
    "zong zou zu zuan zui zun zuo".split())
PINYIN_MAX_SYLLABLE = max(map(len, PINYIN_SYLLABLES))

# English words that are also pinyin syllables: a pair made only of them (``He Long``, ``Ping An``,
# ``You Can``) is not taken for a name without a cue
ENGLISH_PINYIN_WORDS = frozenset(
    "a an ban bang bin bo can die ding dong fan gang gong hang he hen lie long man men ma pan pang pen pie "
    "pin ping ran sang song sun tan tang tie wan wen you yang zen she me lo mo so to".split())

WESTERN_GIVEN_NAMES = frozenset(
    "aaron abby adam adrian alan albert alex alexander alice alicia allen amanda amber amy andrew andy angela "
    "angel anna anne annie anthony april arthur ashley audrey barbara ben benjamin betty bill billy bob bonnie "
    "brandon brian bruce candy carl carol caroline carrie catherine cathy charles charlie charlotte chris "
    "christina christine christopher cindy claire coco connie crystal cynthia daisy daniel danny david dennis "
    "derek diana diane dick dora doris edward edison elaine eleanor elena eli elizabeth ella ellen emily emma "
    "eric erica ethan eva evan evelyn fiona frank fred freda gary george gigi gloria grace gordon hannah harry "
    "harvey hazel helen henry ivan iris irene isabel ivy jack jackie jacky james jane janet jason jay jean "
    "jeff jennifer jenny jerry jessica jessie jim jimmy joan joanna joe john johnny jonathan joseph joy joyce "
    "judy julia julie justin karen kate katherine kathy kelly ken kenneth kevin kitty kris kyle larry laura "
    "lawrence leo leon leslie lily linda lisa louis lucas lucy luke lydia mabel maggie mandy marco margaret "
    "maria mark martin mary matthew max may megan melody melissa michael michelle mike molly monica nancy "
    "natalie nathan nelson nicholas nick nicole nina oliver olivia oscar pamela patrick patty paul peggy peter "
    "philip phoebe rachel ray raymond rebecca richard rick rita robert robin roger ronald rose ruby ryan sabrina "
    "sally sam samantha samuel sandy sara sarah scott sean shirley simon sophia sophie stanley stella stephanie "
    "stephen steve steven sue summer susan sylvia teresa terry thomas tiffany tim timothy tina tom tommy tony "
    "tracy victor victoria vincent vivian wayne wendy william willie winnie winston yvonne zoe".split())

# words after a capitalised pair that make it a place or an organisation, not a person
ROMAN_NOT_PERSON_NEXT = frozenset(
    "bank banking insurance securities group co co. company corp corporation ltd ltd. limited holdings life "
    "road rd rd. street st st. avenue ave lane lu jie district province city county town township village park "
    "branch sub-branch airport station hotel inn university college school hospital port lake river mountain "
    "bridge plaza building tower industrial new hi-tech high-tech development zone area center centre square "
    "mall market technology technologies tech electric electronics motor motors trading logistics capital "
    "fund funds asset assets investment investments trust leasing finance financial futures exchange "
    "commercial rural village office dept department team".split())
ROMAN_NOT_PERSON_PAIRS = frozenset(
    "hang seng|ping an|min sheng|hua xia|xing ye|guang da|zhao shang|bo hai|hai tong|tai ping|zhong xin|"
    "nan jing|shang hai|bei jing|tian jin|chong qing|guang zhou|shen zhen|hang zhou|su zhou|wen zhou|"
    "jin hua|chang zhou|wu han|cheng du|xi an|jin jiang|lu jia zui|zhang jiang|yi wu|kun shan|"
    "chang shu|ning bo|shi jia zhuang|he fei|fu zhou|xia men|qing dao|da lian|tai yuan|chang sha|"
    "nan chang|kun ming|gui yang|nan ning|hai kou|lan zhou|xi ning|yin chuan|ha er bin|chang chun|"
    "shen yang|ji nan|zheng zhou|shi ji|ren min|zhong guo|zhong shan|jian guo|wen san|bin jiang|"
    # Hong Kong districts and areas
    "wan chai|sha tin|tai po|kwun tong|tsuen wan|mong kok|tai koo|sai kung|tin shui|tuen mun|yuen long|"
    "sheung wan|wong tai|kwai chung|tseung kwan|tung chung|ma on".split("|"))
# capitalised words that are not part of a name (pinyin surnames such as He, An, You stay possible)
ROMAN_STOP_WORDS = frozenset(
    "the a an all sir madam madame customer customers colleague colleagues team manager department dept "
    "branch bank office hr it finance risk credit operations compliance support service services client "
    "clients partner partners friend friends everyone valued dear hi hello mr mrs ms miss dr prof and or of "
    "for to in on at by with from this that these those our your their his her its my we you they he she "
    "please thanks thank regards best kind sincerely yours none n/a na tbd unknown same see above below "
    "per as is are was were be been mobile phone tel fax email e-mail address id card no number account "
    "passport ref date re fw fwd subject cc bcc attn attention china chinese english group limited company "
    "committee board director directors officer officers staff admin administrator system noreply no-reply "
    "notification notifications alert alerts desk head general deputy senior junior assistant vice president "
    "chairman ceo cfo cto coo rm".split()) - PINYIN_SURNAMES - {"na", "a"}
